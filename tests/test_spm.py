"""The step-aware preference model: PickScore exactly at initialisation, whatever t; the released checkpoints'
key space (strict, naming what is missing or extra); the reference's tensor preprocessing; any scorer as a
step scorer."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.rewards import create_scorer
from diffalign.rewards.spm import as_step_scorer, build_spm_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scorers():
    return create_scorer("pickscore", tiny=True, device="cpu"), create_scorer("spm", tiny=True, device="cpu")


def _images(n=3, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red circle on grass", "a dog", "two green squares"]


def test_spm_at_initialisation_equals_pickscore_at_every_t(scorers):
    pick, spm = scorers
    images = _images()
    expected = pick.score(images, PROMPTS)
    for t in (0, 1, 250, 999, torch.tensor([0, 500, 999])):
        assert torch.equal(spm.score(images, PROMPTS, t), expected), t
    # the image tower alone, on the reference's tensor preprocessing, at fractional t (flow backbones)
    pixels = spm.pixels(torch.rand(4, 3, 40, 56, generator=torch.Generator().manual_seed(1)))
    clip_features = pick.model.get_image_features(pixel_values=pixels).pooler_output
    for t in (torch.zeros(4), torch.tensor([3.5, 100.0, 640.25, 1000.0])):
        assert torch.equal(spm.model.get_image_features(pixels, t), clip_features)


def test_the_step_parameters_make_the_score_depend_on_t():
    pick = create_scorer("pickscore", tiny=True, device="cpu")
    spm = create_scorer("spm", tiny=True, device="cpu")
    with torch.no_grad():
        for p in list(spm.model.layer_adaln.parameters()) + list(spm.model.pooled_adaln.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    images = _images()
    s0, s9 = spm.score(images, PROMPTS, 0), spm.score(images, PROMPTS, 999)
    assert not torch.allclose(s0, s9) and not torch.allclose(s0, pick.score(images, PROMPTS))


def _reference_keys_and_shapes(clip) -> dict[str, tuple[int, ...]]:
    """The keys of the reference's StepAwarePreferenceModel (its `model` = HFTimeConditionedCLIPModel), written
    out from its module names: the CLIP's own parameters, an adaLN per vision layer, the pooled adaLN and the
    timestep embedder."""
    width = clip.config.vision_config.hidden_size
    keys = {f"model.{k}": tuple(v.shape) for k, v in clip.state_dict().items()}
    for i in range(clip.config.vision_config.num_hidden_layers):
        keys[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = (6 * width, width)
        keys[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = (6 * width,)
    keys["model.vision_model.adaLN_modulation.1.weight"] = (2 * width, width)
    keys["model.vision_model.adaLN_modulation.1.bias"] = (2 * width,)
    keys["model.t_embedder.mlp.0.weight"] = (width, 256)
    keys["model.t_embedder.mlp.0.bias"] = (width,)
    keys["model.t_embedder.mlp.2.weight"] = (width, width)
    keys["model.t_embedder.mlp.2.bias"] = (width,)
    return keys


def _random_reference_state(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(shape, generator=g) for k, shape in _reference_keys_and_shapes(model.clip).items()}


def test_released_checkpoint_key_map_loads_the_reference_keys(tmp_path):
    model, _, _ = build_spm_model(tiny=True)
    assert set(model.reference_state_dict()) == set(_reference_keys_and_shapes(model.clip))
    state = _random_reference_state(model)
    # transformers 4.27 (the SPM trainer's) also saved the position ids: accepted when they are arange
    state["model.text_model.embeddings.position_ids"] = torch.arange(32).view(1, -1)
    path = tmp_path / "sd-v1-5_step-aware_preference_model.bin"
    torch.save(state, path)
    spm = create_scorer("spm", tiny=True, device="cpu", checkpoint=str(tmp_path))  # a folder holding the .bin
    loaded = spm.model.reference_state_dict()
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        assert torch.equal(loaded[k], v), k
    assert spm.model.layer_adaln[1][1].weight.abs().sum() > 0  # the step parameters came from the file


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "position_ids"])
def test_key_map_fails_naming_the_bad_key(change, tmp_path):
    model, _, _ = build_spm_model(tiny=True)
    state = _random_reference_state(model)
    if change == "missing":
        key = "model.vision_model.encoder.layers.1.adaLN_modulation.1.bias"
        del state[key]
        expected = f"missing 1 key(s): {key}"
    elif change == "extra":
        key = "model.vision_model.encoder.layers.0.adaLN_modulation.2.weight"
        state[key] = torch.zeros(3)
        expected = f"unexpected 1 key(s): {key}"
    elif change == "shape":
        key = "model.t_embedder.mlp.0.weight"
        state[key] = torch.zeros(8, 256)
        expected = f"{key}: (8, 256)"
    else:
        key = "model.vision_model.embeddings.position_ids"
        state[key] = torch.arange(17).view(1, -1).flip(-1)
        expected = f"unexpected 1 key(s): {key}"
    path = tmp_path / "spm.bin"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        create_scorer("spm", tiny=True, device="cpu", checkpoint=str(path))
    assert expected in str(err.value) and str(path) in str(err.value)


def test_an_spm_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    model, _, _ = build_spm_model(tiny=True)
    state = _random_reference_state(model) | {"model.logit_scale": Payload()}
    torch.save(state, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError):
        create_scorer("spm", tiny=True, device="cpu", checkpoint=str(tmp_path / "evil.bin"))
    assert "this must never run" not in capsys.readouterr().out


def test_tensor_images_follow_the_reference_preprocessing(scorers):
    """The reference: x in [-1, 1] -> bicubic resize, short side 224 (here the tiny CLIP's 64), int(x + .5)
    rounding -> centre crop when not square -> (x / 2 + 0.5).clamp(0, 1) -> normalise."""
    import torch.nn.functional as F
    from torchvision.transforms import CenterCrop, Normalize

    _, spm = scorers
    x = torch.rand(2, 3, 50, 75, generator=torch.Generator().manual_seed(3)) * 2.4 - 1.2  # beyond [-1, 1]
    size = spm.size
    scale = size / 50
    ref = F.interpolate(x, size=(int(50 * scale + 0.5), int(75 * scale + 0.5)), mode="bicubic", align_corners=False)
    ref = CenterCrop(size)(ref)
    ref = Normalize(spm.mean.flatten().tolist(), spm.std.flatten().tolist())((ref / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(spm.pixels(x / 2 + 0.5), ref, atol=1e-5, rtol=0)


def test_any_scorer_serves_as_a_step_scorer(scorers):
    pick, spm = scorers
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    t = torch.tensor([951.0, 501.0, 0.0])
    as_pick = as_step_scorer(pick)
    assert torch.equal(as_pick(x, PROMPTS, t), pick.score((x / 2 + 0.5).clamp(0, 1), PROMPTS))
    assert torch.equal(as_pick(x, PROMPTS, t), as_pick(x, PROMPTS, torch.zeros(3)))  # ignores t
    assert torch.equal(as_step_scorer(spm)(x, PROMPTS, t), spm.score(x / 2 + 0.5, PROMPTS, t))
