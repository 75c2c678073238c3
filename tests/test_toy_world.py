import numpy as np
import pytest
import torch

from diffalign.sampling import initial_noise, sample_images
from diffalign.toy import world
from diffalign.toy.model import build_scheduler, build_unet, scheduler_config
from diffalign.toy.text import build_text_encoder, build_tokenizer, encode_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_grammar_has_18_prompts_that_parse_back():
    prompts = world.all_prompts()
    assert len(prompts) == 18 == len(set(prompts))
    for p in prompts:
        ((colour, shape),) = world.parse_prompt(p)
        assert p == f"a {colour} {shape}"
    assert world.parse_prompt("a red circle and a blue square") == [("red", "circle"), ("blue", "square")]
    for bad in ("a purple circle", "red circle", "a red", ""):
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_render_is_deterministic_and_follows_the_spec():
    a = world.render_prompt("a green triangle", seed=3)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, world.render_prompt("a green triangle", seed=3))
    assert not np.array_equal(a, world.render_prompt("a green triangle", seed=4))
    for seed in range(200):
        scene = world.sample_scene(np.random.default_rng(seed), [("red", "square")], size=32)
        (obj,) = scene.objects
        side = obj.box[2] - obj.box[0]
        assert 0.35 * 32 <= side <= 0.7 * 32 and obj.box[0] >= 0 and obj.box[2] <= 32 and obj.box[3] <= 32
        img = world.render(scene)
        fg = img.max(-1) > 0
        assert set(map(tuple, img[fg].tolist())) == {(255, 0, 0)}  # pure colour, black elsewhere
        assert abs(fg.sum() - side * side) <= 4 * side + 1


def test_scene_is_data_with_several_objects():
    scene = world.sample_scene(np.random.default_rng(0), [("red", "circle"), ("blue", "square")], size=32)
    assert world.prompt_for(scene) == "a red circle and a blue square"
    colours = {tuple(c) for c in world.render(scene).reshape(-1, 3).tolist()}
    assert {(255, 0, 0), (0, 0, 255), (0, 0, 0)} == colours


def test_corrupt_caption_changes_exactly_one_attribute_at_rate_p():
    rng = np.random.default_rng(0)
    assert all(world.corrupt_caption("a red circle", rng, 0.0) == "a red circle" for _ in range(100))
    changed = 0
    for _ in range(2000):
        out = world.corrupt_caption("a red circle", rng, 0.35)
        ((c, s),) = world.parse_prompt(out)
        assert (c != "red") + (s != "circle") in (0, 1)
        changed += out != "a red circle"
    assert 0.31 < changed / 2000 < 0.39


def test_tokenizer_is_word_level_and_encoder_is_fixed():
    tok = build_tokenizer()
    for word in world.vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a red circle").input_ids
    assert len(ids) == 5 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    te = build_text_encoder(tok)
    assert torch.equal(torch.rand(1), before)  # does not consume the caller's RNG
    assert not any(p.requires_grad for p in te.parameters())
    e1 = encode_prompts(tok, te, ["a red circle", "a blue square"])
    e2 = encode_prompts(build_tokenizer(), build_text_encoder(seed=0), ["a red circle", "a blue square"])
    assert e1.shape == (2, 16, 32) and torch.equal(e1, e2)
    assert not torch.equal(e1[0], e1[1])


def test_unet_is_the_documented_one_and_sampler_is_seeded_per_image():
    unet = build_unet()
    assert sum(p.numel() for p in unet.parameters()) == 975_219  # docs: 0.97 M
    assert unet.config.addition_embed_type == "text"  # the prompt also reaches the timestep embedding
    assert scheduler_config()["num_train_timesteps"] == 1000
    assert scheduler_config()["prediction_type"] == "sample"
    n1 = initial_noise([5, 6], (3, 16, 16))
    n2 = initial_noise([6], (3, 16, 16))
    assert torch.equal(n1[1], n2[0])
    from diffalign.backbones import PixelBackbone

    tok = build_tokenizer()
    bb = PixelBackbone(build_unet(width=8), build_scheduler(), build_text_encoder(tok), tok)
    args = (bb, bb.denoiser, ["a red circle", "a cyan square"], [1, 2])
    a = sample_images(*args, steps=3, guidance=5.0)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, sample_images(*args, steps=3, guidance=5.0))
    assert not np.array_equal(a, sample_images(*args, steps=3, guidance=1.0))
