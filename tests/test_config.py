"""Configs: every shipped recipe validates; bad keys and types give errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffalign.config import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
# every YAML in configs/ is a training recipe except the Syn-Pic generation configs (toy_synpic_*) and the
# `diffalign train-spm` recipes (spm_*, tests/test_spm_training.py)
TRAIN_RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith(("toy_synpic", "spm_")))


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_every_training_recipe_validates(path):
    cfg = load_config(path)
    assert load_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg  # the saved config round-trips


def test_misspelt_keys_name_the_closest_valid_key():
    base = load_config(ROOT / "configs" / "tiny_dpo.yaml").model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'.*Did you mean 'train.max_steps'"):
        load_config(base, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"objective 'dpo' has no parameter 'bta'.*Did you mean 'beta'"):
        load_config(base, ["objective.bta=10"])
    with pytest.raises(ConfigError, match="unknown objective 'dpoo'.*Did you mean 'dpo'"):
        load_config(base, ["objective.name=dpoo"])


def test_wrong_types_say_which_field():
    base = load_config(ROOT / "configs" / "tiny_dpo.yaml").model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"train.batch_size: .*integer.*'two'"):
        load_config(base, ["train.batch_size=two"])
    with pytest.raises(ConfigError, match=r"optim.lr: .*greater than 0"):
        load_config(base, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"model.family: .*Did you mean 'sdxl'\? \(got 'sdx'\)"):
        load_config(base, ["model.family=sdx"])


def test_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml", ["train.max_steps=3", "lora=null", "optim.adam_betas=[0.8, 0.9]"])
    assert cfg.train.max_steps == 3 and cfg.lora is None and cfg.optim.adam_betas == (0.8, 0.9)
    # list indices, and a section created under a null one
    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml", ["validation.prompts=[a, b]", "validation.prompts.1=c", "lora=null", "lora.rank=2"])
    assert cfg.validation.prompts == ["a", "c"] and cfg.lora.rank == 2


def test_inconsistent_choices_are_refused():
    base = load_config(ROOT / "configs" / "tiny_dpo.yaml").model_dump(mode="json")
    with pytest.raises(ConfigError, match="dcpo.*double_caption"):
        load_config(base, ["objective.name=dcpo"])
    with pytest.raises(ConfigError, match="lora_off needs a lora section"):
        load_config(base, ["lora=null", "train.reference=lora_off"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(ROOT / "configs" / "nope.yaml")


def test_recipes_match_their_reference_launchers():
    """Facts read from the reference code (each was wrong once)."""
    sdxl = load_config(ROOT / "configs" / "sdxl_dpo_pickapic.yaml")
    # Salesforce train.py: Adafactor whenever --sdxl, but clipping is skipped only with --use_adafactor
    assert sdxl.optim.optimizer == "adafactor" and sdxl.optim.max_grad_norm == 1.0
    # DCPO-T2I dcpo_trainer.py trains every non-SDXL model at 512 (run.sh passes no resolution)
    assert load_config(ROOT / "configs" / "sd21_dcpo.yaml").data.resolution == 512


@pytest.mark.parametrize(
    ("recipe", "geometry"),
    [("sd15_dpo_pickapic", "independent"), ("sdxl_dpo_pickapic", "independent"), ("sd21_dcpo", "independent"),
     ("sd15_dpo_lora_diffusers", "independent"), ("sdxl_dpo_lora_diffusers", "joint_first"),
     ("sdxl_mapo_pickapic", "joint_first")],
)  # fmt: skip
def test_recipes_crop_and_flip_as_their_reference_scripts_do(recipe, geometry):
    """Salesforce train.py (and its DCPO fork) and the diffusers SD1.5 script transform each image on its own;
    the diffusers SDXL script and MaPO resize jpg_1 to jpg_0 and flip and crop the pair jointly."""
    assert load_config(ROOT / "configs" / f"{recipe}.yaml").data.pair_geometry == geometry
