"""transform_item: loser resized to the winner's size, joint flip and crop, micro-conditioning values."""

import numpy as np
import pytest
import torch
from data_helpers import half, mean_rgb, solid
from PIL import Image

from diffalign.data.transforms import UnusableImage, check_size, decode_image, resized_shape, transform_item


def test_loser_resized_to_winner_and_winner_original_size():
    winner, loser = solid((255, 0, 0), (64, 48)), half((100, 100))  # (W, H)
    out = transform_item([winner, loser], resolution=32, random_crop=False, flip=False)
    assert out["pixel_values"].shape == (2, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    # SDXL micro-conditioning: the WINNER's true (H, W) for every candidate, and one joint crop.
    assert out["original_size"].tolist() == [[48, 64], [48, 64]]
    assert resized_shape(48, 64, 32) == (32, 42)
    assert out["crop_top_left"].tolist() == [[0, 5], [0, 5]]  # center crop of a 32x42 image
    # The loser went through the winner's geometry: resize to 64x48, shorter side 32, same crop window.
    expected = loser.resize((64, 48), Image.BICUBIC).resize((42, 32), Image.BILINEAR).crop((5, 0, 37, 32))
    exp = torch.from_numpy(np.asarray(expected, np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(out["pixel_values"][1], exp, atol=1e-5)
    assert out["pixel_values"].min() >= -1 and out["pixel_values"].max() <= 1


def test_joint_flip_flips_all_candidates():
    # Asymmetric images whose left halves differ: black|white and red|blue.
    a, b = half((64, 64)), half((64, 64), left=(255, 0, 0), right=(0, 0, 255))
    plain = transform_item([a, b], 32, False, flip=False)["pixel_values"]
    flipped = transform_item([a, b], 32, False, flip=True)["pixel_values"]
    assert torch.equal(flipped, plain.flip(-1))
    left = lambda p: mean_rgb(p[:, :, :8])  # noqa: E731
    assert left(plain[0])[0] < 10 and left(flipped[0])[0] > 245  # black left -> white left
    assert left(plain[1])[0] > 245 and left(flipped[1])[2] > 245  # red left -> blue left


def test_random_crop_is_joint_and_follows_the_rng():
    imgs = [half((96, 64)), solid((0, 255, 0), (50, 50))]
    o1 = transform_item(imgs, 32, True, False, np.random.default_rng(3))
    o2 = transform_item(imgs, 32, True, False, np.random.default_rng(3))
    assert torch.equal(o1["pixel_values"], o2["pixel_values"])
    tops_lefts = {
        tuple(transform_item(imgs, 32, True, False, np.random.default_rng(s))["crop_top_left"][0].tolist())
        for s in range(20)
    }
    assert len(tops_lefts) > 3 and all(t == 0 and 0 <= lf <= 16 for t, lf in tops_lefts)  # image is 32x48
    assert (o1["crop_top_left"][0] == o1["crop_top_left"][1]).all()
    with pytest.raises(ValueError, match="crop_rng"):
        transform_item(imgs, 32, True, False, None)


def test_decode_and_size_rules(tmp_path):
    with pytest.raises(UnusableImage) as err:
        decode_image(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert err.value.reason == "corrupt_image"
    with pytest.raises(UnusableImage) as err:
        decode_image("nope.jpg", str(tmp_path))
    assert err.value.reason == "missing_file"
    with pytest.raises(UnusableImage) as err:
        decode_image(None)
    assert err.value.reason == "missing_image"
    with pytest.raises(UnusableImage) as err:
        check_size(solid((0, 0, 0), (1, 1)), min_side=1)  # 1x1 always refused
    assert err.value.reason == "too_small"
    check_size(solid((0, 0, 0), (8, 9)), min_side=8)
    gray = decode_image({"bytes": None, "path": None} | {"bytes": _png_gray()})
    assert gray.mode == "RGB"


def _png_gray():
    import io

    buf = io.BytesIO()
    Image.new("L", (10, 10), 128).save(buf, format="PNG")
    return buf.getvalue()
