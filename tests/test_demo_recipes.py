"""The demo's recipes, the committed configs/toy_*.yaml, the base model's inputs and its cache key."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_committed_configs_are_the_rendered_recipes():
    from diffalign.toy.recipes import DEFAULT_OUT, rendered

    docs = rendered(DEFAULT_OUT)
    committed = sorted(p.stem for p in (ROOT / "configs").glob("toy_*.yaml") if p.stem != "toy_synpic_render")
    assert committed == sorted(docs), "regenerate with: python -m diffalign.toy.recipes --write configs"
    for name, (_, cfg) in docs.items():
        assert yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) == cfg, name


def test_every_demo_config_validates(tmp_path):
    from diffalign.config import load_config
    from diffalign.synpic.config import load_config as load_synpic
    from diffalign.toy.recipes import METHODS, QUICK, rendered

    for recipe in (None, QUICK):
        docs = rendered(tmp_path / "out") if recipe is None else rendered(tmp_path / "q", QUICK)
        assert set(docs) == {"toy_base", "toy_synpic", *(f"toy_{m}" for m in METHODS)}
        for name, (_, cfg) in docs.items():
            if name == "toy_synpic":
                s = load_synpic(raw=cfg)
                assert s.images_per_prompt >= 2
            else:
                c = load_config(cfg)
                assert c.lora is None  # full fine-tuning, as the prototype
    dw = load_config(rendered(tmp_path)["toy_dpo_winner"][1])
    assert dw.objective.params()["winner_weight"] == 500.0
    assert load_config(rendered(tmp_path)["toy_dpo"][1]).objective.params()["winner_weight"] == 0.0  # the default


def test_base_cache_key_follows_the_recipe():
    from diffalign.toy.base import BaseRecipe

    assert BaseRecipe().key() == BaseRecipe().key()
    assert BaseRecipe(steps=601).key() != BaseRecipe().key()
    assert BaseRecipe(corrupt_p=0.3).key() != BaseRecipe().key()


def test_sft_data_is_a_pickapic_parquet_of_renders_with_corrupted_captions(tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.data import DataConfig, build_preference_dataset
    from diffalign.toy.base import BaseRecipe, write_sft_data
    from diffalign.toy.reward import toy_reward_details
    from diffalign.toy.world import all_prompts

    r = BaseRecipe(images=720)
    path = write_sft_data(tmp_path / "sft.parquet", r)
    t = pq.read_table(path).to_pylist()
    assert len(t) == 720 and all(row["jpg_0"] == row["jpg_1"] and row["label_0"] == 1.0 for row in t)
    truth = [all_prompts()[i % 18] for i in range(720)]
    corrupted = np.mean([row["caption"] != p for row, p in zip(t, truth)])
    assert 0.28 < corrupted < 0.42  # corrupt_p = 0.35
    images = np.stack([np.asarray(Image.open(io.BytesIO(row["jpg_0"]))) for row in t])
    assert images.shape == (720, 16, 16, 3)
    assert toy_reward_details(images, truth)["correct"].mean() > 0.95  # the image shows the TRUE prompt
    # read back through the ordinary loader, as the trainer does; SFT reads candidate 0
    ds = build_preference_dataset(DataConfig(format="pickapic", source=str(path), resolution=16))
    assert len(ds) == 720 and ds[0]["pixel_values"].shape == (2, 3, 16, 16)


def test_pixel_folder_round_trip(tmp_path):
    from diffalign.backbones import load_backbone
    from diffalign.toy.base import QUICK_RECIPE, build_init_backbone

    bb = build_init_backbone(replace(QUICK_RECIPE, seed=3))
    bb.save_pretrained(tmp_path / "m")
    index = yaml.safe_load((tmp_path / "m" / "model_index.json").read_text())
    assert "vae" not in index and {"unet", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    back = load_backbone(str(tmp_path / "m"))
    assert back.family == "pixel" and back.vae is None
    for (n, a), (_, b) in zip(bb.denoiser.state_dict().items(), back.denoiser.state_dict().items()):
        assert torch.equal(a, b), n
    prompts = ["a red circle", "", "a cyan triangle"]
    torch.testing.assert_close(bb.encode_text(prompts)["prompt_embeds"], back.encode_text(prompts)["prompt_embeds"])
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "clip_sample"):
        assert back.noise_scheduler.config[key] == bb.noise_scheduler.config[key], key


def test_toy_sampler_uses_the_model_folders_noise_schedule(tmp_path):
    from diffalign.toy.base import QUICK_RECIPE, build_init_backbone
    from diffalign.toy.generators import ToySamplerGenerator

    for pred in ("sample", "epsilon"):
        build_init_backbone(replace(QUICK_RECIPE, prediction_type=pred)).save_pretrained(tmp_path / pred)
        gen = ToySamplerGenerator(unet=str(tmp_path / pred), device="cpu", steps=2)
        gen._load()
        assert gen._parts.process.prediction_type == pred
        assert len(gen.generate(["a red circle"], [0])) == 1


def test_an_interrupted_base_build_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Killed at step 5 of 20 (checkpoints every 2), the next ensure_base resumes at step 4, not step 0, and
    its base model equals an uninterrupted build's bit for bit."""
    from safetensors.torch import load_file

    from diffalign.toy.base import BaseRecipe, ensure_base
    from tests.helpers import crash_then_resume

    recipe = BaseRecipe(width=8, steps=20, batch_size=4, warmup_steps=0, images=32)
    logs: list[str] = []

    def build(root, resume=None):
        return ensure_base(recipe, root=root, log=logs.append, progress=False)

    crash_then_resume(tmp_path / "killed", 5, monkeypatch, runner=build)
    assert any("resuming the interrupted build" in line for line in logs), logs
    assert "at step 4" in capsys.readouterr().out
    whole = build(tmp_path / "whole")
    resumed = tmp_path / "killed" / whole.relative_to(tmp_path / "whole")
    files = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors"))
    for f in files:
        a, b = load_file(str(whole / f)), load_file(str(resumed / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
