"""PickScore, CLIPScore (torchmetrics convention) and CLIP-S on tiny random transformers CLIP models.

Scores are re-derived here with plain PIL / numpy preprocessing and the raw CLIP towers, then compared
with the scorers: this pins the preprocessing (PIL backend, crop offsets, RGB order), the text
truncation (EOS kept for > 77 tokens) and each scale convention.
"""

import numpy as np
import pytest
import torch
from _reward_images import LONG_PROMPT, SIZES, make_image, normalize, quantized_pil, rgb_array
from PIL import Image

from diffalign.rewards import create_scorer
from diffalign.rewards.pickscore import pickscore_probs

S = 64  # tiny CLIP input size


def hf_clip_pixels(img: Image.Image) -> torch.Tensor:
    """transformers-4 CLIP processor semantics: RGB first, shortest side -> S (long side int()-truncated),
    PIL bicubic, centre crop with floor offsets."""
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
    arr = rgb_array(img.resize((nw, nh), Image.BICUBIC))
    top, left = (nh - S) // 2, (nw - S) // 2
    return normalize(arr[top : top + S, left : left + S])


def openai_clip_pixels(img: Image.Image) -> torch.Tensor:
    """OpenAI clip.load semantics: resize/crop on the original mode (rounded crop offsets), then RGB."""
    w, h = img.size
    nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - S) / 2.0)), int(round((nw - S) / 2.0))
    img = img.crop((left, top, left + S, top + S))
    return normalize(rgb_array(img))


def reference_cos(model, tok, pixels, texts):
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        t = model.get_text_features(**ids).pooler_output
        i = model.get_image_features(pixel_values=pixels).pooler_output
    # the pooled text feature must come from a kept EOS token, also for long prompts
    assert (ids["input_ids"] == tok.eos_token_id).any(dim=1).all()
    return torch.nn.functional.cosine_similarity(i, t, dim=-1)


IMAGES = [make_image(h, w, mode, seed=k) for k, ((h, w), mode) in enumerate(zip(SIZES, ["RGB", "RGBA", "L", "RGB", "RGBA"], strict=True))]
PROMPTS = ["a photo of a cat", LONG_PROMPT, "A Painting, of a DOG!", "red", "blue dog on the cat"]


@pytest.fixture(scope="module")
def scorers():
    return {name: create_scorer(name, tiny=True, device="cpu", batch_size=8) for name in ("pickscore", "clipscore", "clip-s")}


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "clip-s"])
def test_formula_and_preprocessing_match_independent_computation(scorers, name):
    s = scorers[name]
    prefix = "A photo depicts " if name == "clip-s" else ""
    pix_fn = openai_clip_pixels if name == "clip-s" else hf_clip_pixels
    pixels = torch.stack([pix_fn(im) for im in IMAGES])
    cos = reference_cos(s.model, s.tokenizer, pixels, [prefix + p for p in PROMPTS])
    if name == "pickscore":
        expected = s.model.logit_scale.exp().item() * cos
    elif name == "clipscore":
        expected = 100 * cos.clamp(min=0)
    else:
        expected = 2.5 * cos.clamp(min=0)
    got = s.score(IMAGES, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert got.std() > 1e-3  # the images really differ in score (the check can fail)


def test_pil_backend_is_used_not_torchvision(scorers):
    # a transformers-5 default (torchvision) processor gives visibly different pixels on this image
    from transformers import CLIPImageProcessor

    img = make_image(90, 37)
    ours = scorers["pickscore"].image_transform([img])[0]
    torch.testing.assert_close(ours, hf_clip_pixels(img), atol=1e-5, rtol=0)
    fast = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    assert (fast(images=[img], return_tensors="pt")["pixel_values"][0] - ours).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["pickscore", "clip-s"])
def test_tensor_input_equals_saved_png(scorers, name):
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    got = scorers[name].score(x, "a cat")
    want = scorers[name].score([quantized_pil(t) for t in x], "a cat")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "clip-s"])
def test_batch_size_invariance(scorers, name):
    s = scorers[name]
    imgs = [make_image(48, 64, seed=i) for i in range(9)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(9)]
    s.batch_size = 8
    a = s.score(imgs, prompts)
    s.batch_size = 1
    b = s.score(imgs, prompts)
    s.batch_size = 8
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shared_prompt_encoded_once(scorers, monkeypatch):
    s = scorers["pickscore"]
    calls = []
    original = s.model.get_text_features

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(s.model, "get_text_features", counting)
    s.batch_size = 3
    s.score([make_image(32, 32, seed=i) for i in range(10)], "one shared prompt")
    s.batch_size = 8
    assert calls == [1]


def test_pickscore_probs_softmax_over_candidates(scorers):
    s = scorers["pickscore"]
    imgs = [make_image(64, 64, seed=i) for i in range(4)]
    p = s.probs(imgs, "a cat")
    torch.testing.assert_close(p, torch.softmax(s.score(imgs, "a cat"), dim=0))
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    torch.testing.assert_close(pickscore_probs(torch.tensor([[0.0, 0.0]])), torch.tensor([[0.5, 0.5]]))


def test_clip_s_uses_prefix(scorers):
    s = scorers["clip-s"]
    img = [make_image(64, 64)]
    with_prefix = s.score(img, "a cat")
    s.prefix = ""
    without = s.score(img, "a cat")
    s.prefix = "A photo depicts "
    assert not torch.allclose(with_prefix, without)


def test_local_folder_loading_and_dtypes(tmp_path):
    from diffalign.rewards._hf_clip import save_tiny_clip

    save_tiny_clip(tmp_path / "clip", seed=3)
    s = create_scorer("pickscore", model=str(tmp_path / "clip"), processor=None, device="cpu")
    t = create_scorer("pickscore", tiny=True, device="cpu", seed=3)
    imgs = [make_image(50, 70, seed=1), make_image(64, 64, seed=2)]
    torch.testing.assert_close(s.score(imgs, "a cat"), t.score(imgs, "a cat"), atol=1e-5, rtol=0)
    for dtype in ("bf16", "fp16"):
        low = create_scorer("clipscore", model=str(tmp_path / "clip"), dtype=dtype, device="cpu")
        assert low.model.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        got = low.score(imgs, "a cat")
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        np.testing.assert_allclose(got.numpy(), 100 * (t.score(imgs, "a cat") / t.model.logit_scale.exp()).clamp(min=0).numpy(), atol=3.0)
