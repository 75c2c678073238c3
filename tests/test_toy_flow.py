"""The toy world with a flow-matching base: the recipe, the model folder, and `diffalign demo --process flow`.
The DDPM demo must not change: its recipe hash and configs stay as they were."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ddpm_recipe_hash_is_unchanged_and_flow_has_its_own():
    from diffalign.toy.base import RECIPE_VERSION, BaseRecipe

    before = {k: v for k, v in asdict(BaseRecipe()).items() if k != "process"}  # the key before the field
    old = hashlib.sha256(json.dumps({"version": RECIPE_VERSION, **before}, sort_keys=True).encode()).hexdigest()[:12]
    assert BaseRecipe().key() == old
    assert BaseRecipe(process="flow").key() != old
    with pytest.raises(ValueError, match="process"):
        BaseRecipe(process="sde")


def test_flow_base_is_a_velocity_model_through_the_flow_process(tmp_path):
    from diffalign.backbones import load_backbone
    from diffalign.toy.base import QUICK_RECIPE, build_init_backbone
    from diffalign.toy.generators import ToySamplerGenerator
    from diffalign.training.experience import mse_energy

    bb = build_init_backbone(replace(QUICK_RECIPE, process="flow"))
    assert bb.process.kind == "flow" and bb.process.density == "logit_normal"
    bb.save_pretrained(tmp_path / "m")
    back = load_backbone(str(tmp_path / "m"))
    assert back.family == "pixel" and back.process.kind == "flow"
    assert type(back.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # the energy is the velocity error: with the UNet's output replaced by the true velocity it is zero
    x0, noise, t = torch.rand(2, 2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16), torch.tensor([700.0, 200.0])
    cond = back.encode_text(["a red circle"] * 4)
    back.predict = lambda model, x, tt, c: (noise.repeat_interleave(2, 0) - x0.flatten(0, 1))
    assert mse_energy(back, back.denoiser, x0, noise, t, cond).abs().max() < 1e-10
    gen = ToySamplerGenerator(unet=str(tmp_path / "m"), device="cpu", steps=2)
    assert len(gen.generate(["a red circle"], [0])) == 1
    assert gen._parts.process.kind == "flow"


def test_flow_recipes_keep_every_hyper_parameter_but_the_process(tmp_path):
    from diffalign.config import load_config
    from diffalign.toy.recipes import FLOW, DemoRecipe, rendered

    ddpm, flow = rendered(tmp_path, DemoRecipe()), rendered(tmp_path, FLOW)
    assert ddpm.keys() == flow.keys()
    for name in ddpm:
        assert ddpm[name][1] == flow[name][1], name  # the same configs: the process lives in the base folder
    assert "--process flow --inputs" in flow["toy_base"][0] and "--process" not in ddpm["toy_base"][0]
    for name, (_, cfg) in flow.items():
        if name != "toy_synpic":
            load_config(cfg)


def test_demo_process_flow_runs_the_loop(tmp_path, monkeypatch, capsys):
    """`diffalign demo --process flow --quick` with one method, in this process."""
    from diffalign.toy import demo

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert demo.main(["--quick", "--process", "flow", "--methods", "dpo", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["base"]["process"] == "flow" and list(results["models"]) == ["base", "dpo"]
    assert results["models"]["dpo"]["mcnemar"]["n"] == 36
    assert "flow-matching base" in (out / "results.md").read_text()
    index = json.loads((out / "base" / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert "base-" in capsys.readouterr().out
