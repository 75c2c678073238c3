"""HPSv2 / HPSv2.1 on a tiny random open_clip model: the HPS transform (ToTensor first, longest side to
224 bicubic with antialias, centred zero pad, no crop) and 100 * cos, re-derived with plain torch."""

import pytest
import torch
from _reward_images import LONG_PROMPT, MEAN, STD, make_image, rgb_array

from diffalign.rewards import create_scorer

SIZE = 224


def hps_pixels(x: torch.Tensor) -> torch.Tensor:
    """[3,H,W] in [0,1] -> [3,224,224], written against torch.nn.functional directly."""
    h, w = x.shape[-2:]
    s = SIZE / max(h, w)
    nh, nw = round(h * s), round(w * s)
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    out = torch.zeros(3, SIZE, SIZE)
    top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
    out[:, top : top + nh, left : left + nw] = x
    return (out - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def reference_scores(model, pixels, prompts):
    from open_clip.tokenizer import SimpleTokenizer

    tokens = SimpleTokenizer(context_length=77)(prompts)
    if LONG_PROMPT in prompts:  # truncated to 77 with EOT kept last
        assert tokens[prompts.index(LONG_PROMPT), -1] == 49407
    with torch.no_grad():
        i = model.encode_image(pixels)
        t = model.encode_text(tokens)
    return 100 * torch.nn.functional.cosine_similarity(i, t, dim=-1)


@pytest.fixture(scope="module")
def scorer():
    return create_scorer("hpsv2.1", tiny=True, device="cpu", batch_size=8)


# sizes exercise: downscale square, pad left/right, pad top/bottom (odd pad), upscale, longest side
# already 224 (no resize, still padded), and exactly 224x224 (untouched)
HW = [(512, 512), (300, 500), (333, 120), (50, 70), (224, 112), (224, 224)]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_formula_and_transform_match_independent_computation(scorer, mode):
    imgs = [make_image(h, w, mode, seed=i) for i, (h, w) in enumerate(HW)]
    prompts = ["a cat", LONG_PROMPT, "Dog!", "a painting", "red", "blue"]
    pixels = torch.stack([hps_pixels(torch.from_numpy(rgb_array(im)).permute(2, 0, 1)) for im in imgs])
    expected = reference_scores(scorer.model, pixels, prompts)
    got = scorer.score(imgs, prompts)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert got.std() > 1e-2


def test_padding_is_centred_zero_before_normalisation(scorer):
    x = torch.ones(1, 3, 100, 50)
    p = scorer.preprocess(x)[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert p.shape == (3, SIZE, SIZE)
    assert torch.allclose(p[:, :, :56], torch.zeros(3, SIZE, 56), atol=1e-6)  # left pad = 112 // 2
    assert torch.allclose(p[:, :, 56 + 112 :], torch.zeros(3, SIZE, 56), atol=1e-6)
    assert torch.allclose(p[:, :, 60:160], torch.ones(3, SIZE, 100), atol=1e-4)


def test_tensor_input_is_used_without_quantisation(scorer):
    x = torch.rand(4, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    expected = reference_scores(scorer.model, torch.stack([hps_pixels(t) for t in x]), ["a cat"] * 4)
    torch.testing.assert_close(scorer.score(x, "a cat"), expected, atol=1e-4, rtol=1e-5)
    # and a list of per-image tensors goes the per-image way with the same result
    torch.testing.assert_close(scorer.score(list(x), "a cat"), expected, atol=1e-4, rtol=1e-5)


def test_batch_size_invariance_and_shared_prompt_once(scorer, monkeypatch):
    imgs = [make_image(64 + 8 * i, 96, seed=i) for i in range(9)]
    a = scorer.score(imgs, "one prompt")
    calls = []
    original = scorer.model.encode_text
    monkeypatch.setattr(scorer.model, "encode_text", lambda t, *a, **k: calls.append(t.shape[0]) or original(t, *a, **k))
    scorer.batch_size = 1
    b = scorer.score(imgs, "one prompt")
    scorer.batch_size = 8
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_checkpoint_loads_with_weights_only_strictly(tmp_path):
    from diffalign.rewards._common import load_torch_state_dict
    from diffalign.rewards.hps import HPS_FILES, build_hps_model

    model, _ = build_hps_model("diffalign-tiny-hps", seed=5)
    # the published files are {'state_dict': open_clip keys}; write one in that schema
    torch.save({"state_dict": model.state_dict()}, tmp_path / HPS_FILES["v2.0"])
    sd = load_torch_state_dict(tmp_path / HPS_FILES["v2.0"])  # weights_only=True inside
    assert set(sd) == set(model.state_dict())
    loaded = create_scorer("hpsv2", tiny=True, device="cpu", checkpoint=str(tmp_path))  # folder -> file name of v2.0
    random = create_scorer("hpsv2", tiny=True, device="cpu", seed=5)
    imgs = [make_image(80, 120)]
    torch.testing.assert_close(loaded.score(imgs, "a cat"), random.score(imgs, "a cat"))
    # strict: a missing key is an error that names it
    del sd["logit_scale"]
    torch.save({"state_dict": sd}, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="logit_scale"):
        create_scorer("hpsv2.1", tiny=True, device="cpu", checkpoint=str(tmp_path / "broken.pt"))


def test_low_precision_runs(scorer):
    imgs = [make_image(64, 64, seed=i) for i in range(2)]
    bf = create_scorer("hpsv2.1", tiny=True, dtype="bf16", device="cpu")
    assert bf.model.visual.conv1.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf.score(imgs, "a cat"), scorer.score(imgs, "a cat"), atol=1.5, rtol=0)


def test_missing_third_party_checkpoint_is_a_clear_error(tmp_path):
    """Shared by HPS and ImageReward: a folder without the expected file names the path it looked for."""
    with pytest.raises(FileNotFoundError, match=r"HPS v2.1 checkpoint not found: .*HPS_v2.1_compressed.pt"):
        create_scorer("hpsv2.1", tiny=True, checkpoint=str(tmp_path), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"ImageReward checkpoint not found: .*ImageReward.pt"):
        create_scorer("imagereward", tiny=True, checkpoint=str(tmp_path), device="cpu")
