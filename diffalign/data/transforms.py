"""Image decoding and the crop/flip of one item's candidates (pure functions).

Joint geometry (docs/data.md, "Transform conventions and where they come from"), as the diffusers SDXL DPO
port and MaPO do it:
1. every other candidate is resized to one frame image's (W, H), so one crop window fits all of them;
   `original_size` is that frame's true (H, W) for every candidate (SDXL micro-conditioning). The frame is
   the winner (`pair_geometry: joint_winner`) or the first stored image (`joint_first`: jpg_0, as the
   diffusers SDXL script and MaPO take it);
2. the shorter side is resized to `resolution` (bilinear, antialiased), the longer side to
   int(resolution * long / short) as torchvision's Resize(int) does;
3. the horizontal flip, when drawn, is applied to all candidates together, BEFORE the crop;
4. one crop window (center, or random when `random_crop`) is cut from all candidates; `crop_top_left`
   is its (top, left) in the resized (and flipped) image;
5. pixels go to float32 in [-1, 1], channels first.
Independent geometry (`pair_geometry: independent`, Salesforce's train.py and the diffusers SD1.5 script):
each candidate is resized, flipped (its own draw) and cropped on its own, with its own original_size and
crop_top_left.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps


class UnusableImage(Exception):
    """An image that cannot be used; `reason` names the stats counter it increments."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(value, base_dir: str | None = None) -> Image.Image:
    """Decode one stored image: encoded bytes, a datasets Image struct {bytes, path}, a path, or a PIL image.

    Raises UnusableImage("corrupt_image" | "missing_image" | "missing_file", ...) for what cannot be read.
    """
    if isinstance(value, Image.Image):
        img = value
    else:
        if isinstance(value, dict):  # datasets' Image storage: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None or (isinstance(value, (bytes, str)) and len(value) == 0):
            raise UnusableImage("missing_image", "image is empty / null")
        if isinstance(value, (bytes, bytearray, memoryview)):
            stream = io.BytesIO(bytes(value))
        elif isinstance(value, str):
            path = value if (base_dir is None or os.path.isabs(value)) else os.path.join(base_dir, value)
            if not os.path.isfile(path):
                raise UnusableImage("missing_file", f"image file not found: {path}")
            stream = path
        else:
            raise UnusableImage("corrupt_image", f"cannot decode an image from a {type(value).__name__}")
        try:
            img = Image.open(stream)
            img.load()  # force the full decode now: truncated JPEGs fail here, not later
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
            raise UnusableImage("corrupt_image", f"undecodable image: {type(err).__name__}: {err}") from err
    try:
        return to_rgb(img)
    except Exception as err:  # a broken EXIF block, a mode PIL cannot convert
        raise UnusableImage("corrupt_image", f"cannot convert a {img.mode} image to RGB: {err}") from err


#: what transparent pixels are composited onto (docs/data.md): white, as browsers show a transparent PNG
#: on a default page and as transformers' image processors composite transparency.
ALPHA_BACKGROUND = (255, 255, 255)

#: PIL modes holding one channel wider than 8 bits: 16-bit unsigned ("I;16*", what 16-bit grayscale PNG
#: and TIFF open as), 32-bit signed ("I") and 32-bit float ("F").
HIGH_BIT_DEPTH_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """A one-channel image wider than 8 bits -> 8-bit "L", scaling its full range onto 0..255.

    PIL's own convert("RGB") clips these values at 255 instead of scaling them, so a mid-grey 16-bit
    PNG (32768) comes out white. Rules: "I;16*" and "I" are read as 16-bit, 0..65535 -> v / 257 (0 -> 0,
    65535 -> 255, 32768 -> 128); "F" is read as floats in [0, 1] -> v * 255. Values outside the range
    are clipped, and the result is rounded to the nearest integer."""
    arr = np.asarray(img, dtype=np.float64)
    scaled = arr * 255.0 if img.mode == "F" else arr / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def composite_on_background(img: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """An image with transparency (RGBA, LA, PA, premultiplied RGBa / La, or a palette / L / RGB image
    with a transparent colour) -> RGB, alpha-composited over `background`."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, the way a viewer shows it (docs/data.md, "Image decoding"):
    turned upright by its EXIF orientation, wide grey scaled onto 0..255, transparency composited onto
    white, other modes (L, P, CMYK, YCbCr, 1 ...) through PIL's conversion."""
    img = ImageOps.exif_transpose(img)  # a copy without the orientation tag; applying it twice is a no-op
    if img.mode in HIGH_BIT_DEPTH_GREY:
        img = high_bit_depth_to_l(img)
    if img.has_transparency_data:
        return composite_on_background(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def check_size(img: Image.Image, min_side: int) -> None:
    """Raise UnusableImage("too_small") if the shorter side is below `min_side` (1x1 always fails)."""
    if min(img.size) < max(2, min_side):
        raise UnusableImage(
            "too_small", f"image {img.size[0]}x{img.size[1]} has a side below {max(2, min_side)} px"
        )


def resized_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to `resolution` (torchvision Resize(int) rule)."""
    if height <= width:
        return resolution, max(resolution, int(resolution * width / height))
    return max(resolution, int(resolution * height / width)), resolution


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def _crop_window(new_h: int, new_w: int, resolution: int, random_crop: bool, crop_rng) -> tuple[int, int]:
    if random_crop:
        if crop_rng is None:
            raise ValueError("random_crop=True needs a crop_rng (numpy Generator)")
        return int(crop_rng.integers(0, new_h - resolution + 1)), int(crop_rng.integers(0, new_w - resolution + 1))
    # torchvision CenterCrop rule
    return int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))


def _resize_flip_crop(img: Image.Image, new_w: int, new_h: int, flip: bool, top: int, left: int, resolution: int):
    img = img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img.crop((left, top, left + resolution, top + resolution)))


def transform_item(
    images: Sequence[Image.Image],
    resolution: int,
    random_crop: bool,
    flip: bool | Sequence[bool],
    crop_rng: np.random.Generator | None = None,
    frame: int | None = 0,
) -> dict[str, torch.Tensor]:
    """Resize, flip and crop the K candidates of one item (winner / best first).

    `frame` is the index of the image whose size the others take (joint geometry), or None to treat each
    image on its own (independent geometry; `flip` may then be one bool per image). `flip` is decided by
    the caller (so a latent cache can ask for either); `crop_rng` (a numpy Generator) draws the random crop
    and is only used when `random_crop`. Returns pixel_values float32 [K, 3, R, R] in [-1, 1],
    original_size int64 [K, 2] and crop_top_left int64 [K, 2] ((H, W) and (top, left) of each candidate).
    """
    if len(images) == 0:
        raise ValueError("transform_item needs at least one image")
    rgb = [to_rgb(img) for img in images]
    flips = [bool(f) for f in flip] if isinstance(flip, Sequence) else [bool(flip)] * len(rgb)
    if len(flips) != len(rgb):
        raise ValueError(f"got {len(flips)} flips for {len(rgb)} images")
    if frame is None:
        out, sizes, crops = [], [], []
        for img, f in zip(rgb, flips):
            width, height = img.size
            new_h, new_w = resized_shape(height, width, resolution)
            top, left = _crop_window(new_h, new_w, resolution, random_crop, crop_rng)
            out.append(_resize_flip_crop(img, new_w, new_h, f, top, left, resolution))
            sizes.append([height, width])
            crops.append([top, left])
        return {"pixel_values": torch.stack(out), "original_size": torch.tensor(sizes, dtype=torch.int64),
                "crop_top_left": torch.tensor(crops, dtype=torch.int64)}  # fmt: skip
    width, height = rgb[frame].size
    same = [img if img.size == (width, height) else img.resize((width, height), Image.BICUBIC) for img in rgb]
    new_h, new_w = resized_shape(height, width, resolution)
    top, left = _crop_window(new_h, new_w, resolution, random_crop, crop_rng)
    out = [_resize_flip_crop(img, new_w, new_h, flips[0], top, left, resolution) for img in same]
    k = len(out)
    return {
        "pixel_values": torch.stack(out),
        "original_size": torch.tensor([[height, width]] * k, dtype=torch.int64),
        "crop_top_left": torch.tensor([[top, left]] * k, dtype=torch.int64),
    }
