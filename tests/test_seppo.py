"""SePPO: the anchor-flip loss against an independent computation, the checkpoint-pool reference (draws,
membership, resume, 2 processes, adapters that never train), generated losers sharing the winner's noise,
and the single-image jsonl data it can learn from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import (
    assert_states_close,
    crash_then_resume,
    launch,
    logged,
    run,
    tiny_config,
    trainable_state,
)

ROOT = Path(__file__).resolve().parents[1]

#: SePPO on the tiny SD with LoRA: pool members every 2 steps, x_ref sampled in 2 DDIM steps with CFG 3
SEPPO = dict(
    objective={"name": "seppo"},
    checkpoint={"every": 2, "keep": 1},
    experience={"sampler": {"steps": 2, "guidance": 3.0}},
)


def tiny_recipe(out: Path, **sections) -> dict:
    """configs/tiny_seppo.yaml writing into `out`, with sections overridden (merged one level deep)."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_seppo.yaml").read_text())
    cfg |= {"output_dir": str(out / "run"), "logging": {**cfg["logging"], "tensorboard": False}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


# ---- the loss ---------------------------------------------------------------------------------------------


def _reference_loss(e, r, beta, flip):
    """Per item, in plain Python floats: s from the anchor, the loss and its derivatives by hand."""
    B = len(e)
    loss, grad = 0.0, [[0.0, 0.0] for _ in range(B)]
    for i in range(B):
        d_w, d_r = e[i][0] - r[i][0], e[i][1] - r[i][1]
        s = 1.0 if d_w <= 0 else {"sign": -1.0, "mask": 0.0, "none": 1.0}[flip]
        x = -0.5 * beta * (d_w - s * d_r)
        loss += math.log1p(math.exp(-x)) / B  # -log sigmoid(x)
        g = 1.0 / (1.0 + math.exp(x)) / B  # sigmoid(-x) / B = -dL/dx
        grad[i] = [0.5 * beta * g, -0.5 * beta * s * g]  # dL/de_w, dL/de_ref-sample
    return loss, grad


@pytest.mark.parametrize("flip", ["sign", "mask", "none"])
def test_seppo_loss_and_gradients_match_an_independent_computation(flip):
    from diffalign.objectives import get_objective

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(6, 2, generator=g, dtype=torch.float64)
    d = (torch.rand(6, 2, generator=g, dtype=torch.float64) - 0.5) * 0.01
    d[0, 0] = 0.0  # D_w = 0 exactly (policy == reference): counts as an anchor that holds, s = +1
    d[1, 0], d[2, 0] = 0.004, -0.003  # one anchor that fails, one that holds
    energy = (ref + d).requires_grad_(True)
    loss, metrics = get_objective("seppo")(energy, ref, None, beta=300.0, flip=flip)
    loss.backward()
    want, want_grad = _reference_loss(energy.tolist(), ref.tolist(), 300.0, flip)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(energy.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-15)
    fails = (d[:, 0] > 0).double().mean()
    assert metrics["flip_frac"].item() == pytest.approx(fails.item()) and 0 < fails < 1
    assert metrics["drift_w"].item() == pytest.approx(d[:, 0].mean().item())  # D_w
    assert metrics["drift_l"].item() == pytest.approx(d[:, 1].mean().item())  # D_r


def test_seppo_refuses_lists_and_unknown_flips():
    from diffalign.objectives.seppo import anchor_sign, seppo_loss

    with pytest.raises(ValueError, match="SePPO takes"):
        seppo_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="flip must be one of"):
        anchor_sign(torch.zeros(2), "flop")


# ---- the pool: membership and draws --------------------------------------------------------------------------


def test_pool_membership_and_draws_are_functions_of_seed_and_step():
    from diffalign.training.reference import CheckpointPoolReference, pool_steps

    assert pool_steps(0, 30, 8) == [0]
    assert pool_steps(59, 30, 8) == [0, 30]
    assert pool_steps(100, 25, 8) == [0, 25, 50, 75, 100]  # fewer checkpoints than the cap: all stay
    assert pool_steps(200, 25, 8) == [0, 50, 75, 100, 125, 150, 175, 200]
    assert pool_steps(300, 30, 4) == [0, 240, 270, 300]  # the oldest checkpoints leave, theta_0 stays
    assert pool_steps(300, 30, 1) == [0]

    def draws(seed, draw="uniform", steps=range(400)):
        pool = CheckpointPoolReference(None, lora=True, seed=seed, every=1, draw=draw, output_dir="unused")
        pool.members = dict.fromkeys([0, 30, 60, 90])
        out = []
        for s in steps:
            pool.step = s
            out.append(pool.drawn())
        return out

    a = draws(0)
    assert a == draws(0) and a != draws(1)
    assert {m: a.count(m) for m in (0, 30, 60, 90)} == pytest.approx({m: 100 for m in (0, 30, 60, 90)}, abs=30)
    assert set(draws(0, "first", range(5))) == {0} and set(draws(0, "last", range(5))) == {90}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_pool_member_is_the_policy_at_its_checkpoint_bit_for_bit(tmp_path, lora):
    # draw "last" with a member every step: each step's reference is the checkpoint just saved, i.e. the
    # current policy, so D_w = D_r = 0 exactly and the loss is log 2 at every step
    cfg = tiny_config(tmp_path, **{**SEPPO, "checkpoint": {"every": 1, "keep": 1}},
                      train={"max_steps": 3, "batch_size": 2, "pool": {"draw": "last"}},
                      **({} if lora else {"lora": None, "optim": {"lr": 1e-4}}))  # fmt: skip
    run(cfg)
    rows = logged(cfg)
    assert [r["ref_step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-7) and r["drift_w"] == 0 and r["drift_l"] == 0
    assert rows[-1]["err_w"] != rows[0]["err_w"]  # the policy did move


def _last_per_step(path: Path) -> dict[int, dict]:
    return {d["step"]: d for d in map(json.loads, path.read_text().splitlines())}


def test_seppo_lora_run_resumes_bit_exactly_and_its_pool_adapters_never_train(tmp_path, monkeypatch):
    from peft.utils import get_peft_model_state_dict

    # the tiny recipe: 6 steps, members every 2 steps, at most 3; keep 1 prunes every checkpoint folder but
    # the newest, so the run resumed from step 4 reads member 2 from checkpoints/pool/; the final
    # checkpoint (6) evicts member 2
    full_cfg = tiny_recipe(tmp_path / "full")
    assert full_cfg["train"]["max_steps"] == 6 and full_cfg["train"]["pool"]["cap"] == 3
    full = run(full_cfg)
    part = tiny_recipe(tmp_path / "part")
    resumed = crash_then_resume(part, 5, monkeypatch)
    assert [r["step"] for r in logged(part)] == [1, 2, 3, 4, 5, 5, 6]
    assert_states_close(trainable_state(full), trainable_state(resumed), atol=0, rtol=0)
    draws = _last_per_step(Path(full_cfg["output_dir"]) / "logs" / "pool_draws.jsonl")
    assert draws == _last_per_step(Path(part["output_dir"]) / "logs" / "pool_draws.jsonl")
    assert [draws[s]["members"] for s in range(1, 7)] == [[0], [0], [0, 2], [0, 2], [0, 2, 4], [0, 2, 4]]
    assert 2 in (draws[5]["ref_step"], draws[6]["ref_step"])  # after the resume, a member read from the pool file
    assert [r["ref_step"] for r in logged(full_cfg)] == [draws[s]["ref_step"] for s in range(1, 7)]

    # the pool's adapters: on the policy's denoiser, frozen, without gradients, in no optimizer group, not
    # counted as trainable, and absent from the export and the checkpoints
    unet = resumed.acc.unwrap_model(resumed.unet)
    assert set(unet.peft_config) == {"default", "pool4", "pool6"}
    pool_params = [p for n, p in unet.named_parameters() if ".pool" in n]
    assert pool_params and all(not p.requires_grad and p.grad is None for p in pool_params)
    optimized = {id(p) for group in resumed.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in pool_params}
    default = get_peft_model_state_dict(unet)
    assert sum(p.numel() for p in resumed.params) == sum(v.numel() for v in default.values())
    assert f"LoRA rank 4: {sum(v.numel() for v in default.values()):,} of" in resumed.summary()
    exported = load_file(str(Path(part["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    assert len(exported) == len(default) and not any("pool" in k for k in exported)
    saved = load_file(str(Path(part["output_dir"]) / "checkpoints" / "step-0000006" / "lora_0.safetensors"))
    assert saved.keys() == default.keys()
    # member 4 still holds the policy's adapter of step 4 (its pool file) after two more optimizer steps
    member = load_file(str(Path(part["output_dir"]) / "checkpoints" / "pool" / "step-0000004.safetensors"))
    state = get_peft_model_state_dict(unet, adapter_name="pool4")
    assert state.keys() == member.keys() and all(torch.equal(state[k], member[k]) for k in member)
    assert not (Path(part["output_dir"]) / "checkpoints" / "pool" / "step-0000002.safetensors").exists()


def test_seppo_two_processes_match_one_process_with_double_batch(tmp_path):
    optim = {"adam_eps": 1e-4}  # see test_experience.py on adam_eps
    # seed 1 draws member 2 (a pool adapter, run through the DDP wrapper) for update 3
    one = tiny_recipe(tmp_path / "one", optim=optim, train={"batch_size": 2, "max_steps": 4, "seed": 1})
    two = tiny_recipe(tmp_path / "two", optim=optim, train={"batch_size": 1, "max_steps": 4, "seed": 1})
    launch(one, 1, tmp_path)
    launch(two, 2, tmp_path)
    a = load_file(str(Path(one["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(two["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    assert_states_close(a, b, atol=1e-6, rtol=0)
    draws = [(Path(c["output_dir"]) / "logs" / "pool_draws.jsonl").read_text() for c in (one, two)]
    assert draws[0] == draws[1] and '"step": 3, "ref_step": 2, "members": [0, 2]' in draws[0]
    assert [r["ref_step"] for r in logged(one)] == [r["ref_step"] for r in logged(two)] == [0, 0, 2, 0]
    # the first step's loss agrees as closely as the offline test's; later ones carry beta = 2000 times the
    # float rounding of the weights, which agree to 1e-6 (above)
    assert logged(one)[0]["loss"] == pytest.approx(logged(two)[0]["loss"], rel=1e-5)
    for x, y in zip(logged(one), logged(two)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3)


# ---- generated losers ----------------------------------------------------------------------------------------


def test_the_reference_sample_shares_the_winners_noise_and_timestep_and_replays_from_seed_and_step(tmp_path, monkeypatch):
    from diffalign.config import load_config
    from diffalign.data import collate_preference
    from diffalign.training.trainer import Trainer

    def trainer(seed):
        t = Trainer(load_config(tiny_config(tmp_path / str(seed), **SEPPO, train={"batch_size": 2, "seed": seed})))
        t.reference.on_step(0)
        return t

    seen = []

    def noised(t):  # the (x0, noise, timestep) rows the trainer's process noises
        process, real = t.backbone.process, t.backbone.process.add_noise

        def spy(x0, noise, ts):
            seen.append((x0.clone(), noise.clone(), ts.clone()))
            return real(x0, noise, ts)

        monkeypatch.setattr(process, "add_noise", spy)
        return t

    tr = noised(trainer(0))
    batch = tr._to_device(collate_preference([tr.dataset[i] for i in (0, 1)]))
    tr.source.next(batch, 0, tr.unet, tr.reference).energy(tr.unet)
    x0, noise, t = seen[0]  # rows item-major: (winner 0, x_ref 0, winner 1, x_ref 1)
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3]) and not torch.equal(noise[0], noise[2])
    assert t[0] == t[1] and t[2] == t[3]
    assert not torch.equal(x0[0], x0[1])  # the second candidate is the sample, not the winner
    # x_ref is a function of (seed, stream position, drawn member): the same micro-step replays it
    tr.source.next(batch, 0, tr.unet, tr.reference).energy(tr.unet)
    assert torch.equal(seen[1][0], x0)
    tr.source.next(batch, 3, tr.unet, tr.reference).energy(tr.unet)
    assert not torch.equal(seen[2][0][1], x0[1])
    other = noised(trainer(1))
    other.source.next(batch, 0, other.unet, other.reference).energy(other.unet)
    assert not torch.equal(seen[3][0][1], x0[1])


# ---- config and data ---------------------------------------------------------------------------------------


def test_seppo_config_defaults_and_refusals(tmp_path):
    from diffalign.config import ConfigError, load_config

    cfg = load_config(tiny_config(tmp_path, objective={"name": "seppo"}))
    assert cfg.reference_kind() == "pool" and cfg.experience_source() == "generated"
    assert cfg.objective.params() == {"beta": 2000.0, "flip": "sign"}
    assert load_config(tiny_config(tmp_path)).reference_kind() == "lora_off"  # DPO keeps its reference
    with pytest.raises(ConfigError, match="must be a multiple of checkpoint.every=4"):
        load_config(tiny_config(tmp_path, objective={"name": "seppo"}, checkpoint={"every": 4},
                                train={"pool": {"every": 6}}))  # fmt: skip
    with pytest.raises(ConfigError, match="learns from \\['generated'\\]"):
        load_config(tiny_config(tmp_path, objective={"name": "seppo"}, experience={"source": "offline"}))
    with pytest.raises(ConfigError, match="Did you mean 'mask'"):
        load_config(tiny_config(tmp_path, objective={"name": "seppo", "flip": "masc"}))


def test_a_plain_image_and_prompt_jsonl_gives_single_image_items_seppo_learns_from(tmp_path):
    from diffalign.config import load_config
    from diffalign.data import DataConfig, build_preference_dataset, collate_preference
    from diffalign.data.sources import DataFormatError
    from diffalign.training.trainer import Trainer
    from tests.data_helpers import half

    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        half(left=colour).save(tmp_path / f"{i}.png")
    lines = [{"prompt": f"prompt {i}", "image": f"{i}.png"} for i in range(3)] + [{"prompt": "x", "image": "no.png"}]
    path = tmp_path / "images.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = build_preference_dataset(DataConfig(format="jsonl", source=str(path), resolution=16))
    assert len(ds) == 4 and ds.num_candidates == 1 and ds[3] is None  # the missing file: a counted skip
    item = ds[1]
    assert item["pixel_values"].shape == (1, 3, 16, 16) and item["captions"] == ["prompt 1"]
    assert item["phi"].tolist() == [1.0] and ds.stats["missing_file"] == 1
    with pytest.raises(DataFormatError, match="no pairs to make"):
        build_preference_dataset(DataConfig(format="jsonl", source=str(path), resolution=16, ranked_as_pairs=True))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "image": ["0.png"]}) + "\n")
    with pytest.raises(DataFormatError, match="line 1: 'image' must be a path string"):
        build_preference_dataset(DataConfig(format="jsonl", source=str(tmp_path / "bad.jsonl"), resolution=16))
    # SePPO's experience: the image against the reference's sample from its prompt
    # one item of four is the missing file: allow that share (the default 0.2 stops a run before it starts)
    cfg = tiny_config(tmp_path, **SEPPO, data={"format": "jsonl", "source": str(path), "resolution": 32,
                                               "max_skip_fraction": 0.5})
    trainer = Trainer(load_config(cfg))
    trainer.reference.on_step(0)
    loss, metrics = trainer.compute_loss(trainer._to_device(collate_preference([trainer.dataset[i] for i in (0, 2)])), 0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["ref_step"] == 0  # policy == theta_0
