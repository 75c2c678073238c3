"""decode_image (training data, `diffalign score`, the eval report): wide grey, EXIF orientation, alpha
and other modes all become the 8-bit RGB a viewer would show (docs/data.md, "Image decoding")."""

import io

import numpy as np
import pytest
from PIL import Image

from diffalign.data.transforms import decode_image, transform_item


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# ---------------------------------------------------------------------------------------- 16-bit grey


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt, tmp_path):
    levels = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)  # black, 1/255, mid, white
    data = _encode(Image.fromarray(levels), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")  # what these files open as
    out = _rgb(decode_image(data))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out == out[..., :1]).all()  # grey stays grey
    path = tmp_path / f"grey.{fmt.lower()}"
    path.write_bytes(data)
    assert abs(_rgb(decode_image(str(path))).mean() - (0 + 1 + 128 + 255) / 4) < 1e-9


def test_mid_grey_16_bit_png_reads_as_mid_grey():
    data = _encode(Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)))
    assert abs(_rgb(decode_image(data)).mean() - 128) <= 1


def test_32_bit_int_and_float_modes():
    i32 = Image.fromarray(np.array([[0, 32768, 65535, 70000]], dtype=np.int32))
    assert i32.mode == "I"
    assert _rgb(decode_image(i32))[0, :, 0].tolist() == [0, 128, 255, 255]  # 16-bit range, clipped above
    f32 = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32))
    assert f32.mode == "F"
    assert _rgb(decode_image(f32))[0, :, 0].tolist() == [0, 128, 255, 255]  # [0, 1] floats


def test_transform_item_uses_the_same_rule_for_pil_inputs():
    grey16 = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))
    px = transform_item([grey16], resolution=16, random_crop=False, flip=False)["pixel_values"]
    assert abs(float(px.mean()) - (128 / 127.5 - 1)) < 1e-6


# ---------------------------------------------------------------------------------------- EXIF orientation


def _left_red_right_blue(w=32, h=16) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be turned 90 degrees clockwise to be shown
    data = _encode(_left_red_right_blue(), fmt, exif=exif.tobytes())
    out = _rgb(decode_image(data))
    assert out.shape == (32, 16, 3)  # (H, W): the 32x16 stored image is shown 16 wide, 32 tall
    # turning clockwise moves the stored left edge (red) to the top and the right edge (blue) to the bottom
    top, bottom = out[2, 8], out[-3, 8]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_of_pil_inputs_and_no_tag():
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down: turn 180 degrees
    img = Image.open(io.BytesIO(_encode(_left_red_right_blue(), "PNG", exif=exif.tobytes())))
    out = _rgb(decode_image(img))
    assert out.shape == (16, 32, 3) and out[8, 2, 2] > 200 and out[8, -3, 0] > 200  # blue left, red right
    plain = _rgb(decode_image(_encode(_left_red_right_blue(), "PNG")))
    assert plain[8, 2, 0] == 255 and plain[8, -3, 2] == 255  # no tag: unchanged


# ---------------------------------------------------------------------------------------- alpha and modes

WHITE = [255, 255, 255]


def test_rgba_is_composited_onto_white():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black everywhere ...
    arr[0, 0] = (255, 0, 0, 255)  # ... but one opaque red pixel
    arr[0, 1] = (255, 0, 0, 128)  # and one half-transparent red pixel
    out = _rgb(decode_image(_encode(Image.fromarray(arr, "RGBA"))))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1, 0] == 255 and abs(out[0, 1, 1] - 127) <= 1 and abs(out[0, 1, 2] - 127) <= 1
    assert out[3, 3].tolist() == WHITE  # dropping alpha would have given black


def test_la_and_palette_transparency_are_composited_onto_white():
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert _rgb(decode_image(_encode(la)))[0, 0].tolist() == WHITE
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    p.putpixel((1, 1), 1)
    out = _rgb(decode_image(_encode(p, transparency=0)))  # palette index 0 (black) is transparent
    assert out[0, 0].tolist() == WHITE and out[1, 1].tolist() == [0, 255, 0]
    key = Image.new("RGB", (4, 4), (10, 20, 30))
    key.putpixel((2, 2), (200, 0, 0))
    out = _rgb(decode_image(_encode(key, transparency=(10, 20, 30))))  # an RGB PNG with a transparent colour
    assert out[0, 0].tolist() == WHITE and out[2, 2].tolist() == [200, 0, 0]


def test_cmyk_and_other_modes_convert():
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan ink
    out = _rgb(decode_image(_encode(cmyk, "JPEG", quality=100)))
    assert np.abs(out - [0, 255, 255]).max() <= 3
    out = _rgb(decode_image(_encode(Image.new("L", (4, 4), 77))))
    assert (out == 77).all()
    out = _rgb(decode_image(_encode(Image.new("1", (4, 4), 1))))
    assert (out == 255).all()
