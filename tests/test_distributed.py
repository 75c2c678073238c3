"""Multi-process training on CPU: checkpoints under N processes, FSDP2 and DeepSpeed ZeRO through accelerate
with the bundled launch configs (configs/accelerate/), and the configs themselves.

Each launch costs 20-60 s on a 2-core machine, so each test is one CI-sized run of its capability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_states_close, launch, logged, run, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ("ddp", "fsdp", "zero2", "zero3")
# as in test_training's 2-process test: Adam's first update is lr * g / (|g| + eps), so with the default eps a
# gradient entry near 1e-8 turns float rounding of the cross-process reduction into a visible weight change;
# a larger eps keeps the comparisons about the gradients
ADAM = {"lr": 1e-3, "adam_eps": 1e-4}

try:
    import deepspeed  # noqa: F401

    HAVE_DEEPSPEED = True
except ImportError:
    HAVE_DEEPSPEED = False
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (diffalign[deepspeed])")


def lora_of(cfg: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(cfg["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))


def assert_complete(cfg: dict, nproc: int, expected_files: set[str]) -> list[str]:
    """Every checkpoint folder is whole: its trainer state names its own step, every rank's RNG state and
    the expected files are there, no half-written folder is left, and `latest` names the newest."""
    root = Path(cfg["output_dir"]) / "checkpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names and not [n for n in names if n.endswith(".tmp")], names
    for name in names:
        folder = root / name
        files = {p.name for p in folder.iterdir()}
        want = expected_files | {f"random_states_{r}.pkl" for r in range(nproc)}
        assert want <= files, f"{name} lacks {sorted(want - files)}"
        assert json.loads((folder / "trainer_state.json").read_text())["step"] == int(name.split("-")[1])
    assert (root / "latest").read_text() == names[-1]
    return names


@pytest.mark.slow
def test_two_process_checkpoints_every_step_are_always_complete(tmp_path):
    """Every rank's LoRA hook once wrote into step-N.tmp while rank 0 renamed it (3 of 7 launches of the tiny
    recipe died at the first checkpoint). Two launches x four checkpoints, each checked whole: in one rank 1
    writes its files late (rank 0 must not rename before it has), in the other rank 0 arrives late (its
    clearing of a stale step-N.tmp must not delete what rank 1 wrote)."""
    for attempt, slow in enumerate(("1:write", "0:enter")):
        cfg = tiny_config(tmp_path / f"r{attempt}", train={"batch_size": 1, "max_steps": 4},
                          checkpoint={"every": 1, "keep": 10})  # fmt: skip
        launch(cfg, 2, tmp_path, env={"DIFFALIGN_TEST_SLOW_RANK": slow})
        names = assert_complete(cfg, 2, {"trainer_state.json", "lora_0.safetensors", "optimizer.bin",
                                         "scheduler.bin"})  # fmt: skip
        assert names == [f"step-{s:07d}" for s in (1, 2, 3, 4)]
        sd = load_file(str(Path(cfg["output_dir"]) / "checkpoints" / names[-1] / "lora_0.safetensors"))
        assert sd and all(torch.isfinite(v).all() for v in sd.values())


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_resume_and_export_a_lora(tmp_path):
    """FSDP2 (configs/accelerate/fsdp.yaml) on two CPU processes, 2 micro-batches accumulated through
    accelerate.accumulate: killed after step 1, resumed from its sharded checkpoint, it ends where one
    process with the double batch ends, and its LoRA loads in diffusers."""
    common = dict(checkpoint={"every": 1, "keep": 5}, optim=ADAM)
    one = tiny_config(tmp_path / "one", train={"batch_size": 2, "grad_accum": 2, "max_steps": 2}, **common)
    run(one)
    two = tiny_config(tmp_path / "fsdp", train={"batch_size": 1, "grad_accum": 2, "max_steps": 2}, **common)
    launch(two, 2, tmp_path, accelerate_config="fsdp", env={"DIFFALIGN_TEST_CRASH_AT_STEP": "1"}, expect_fail=True)
    assert_complete(two, 2, {"trainer_state.json", "pytorch_model_fsdp_0", "optimizer_0", "scheduler.bin"})
    out = launch(two, 2, tmp_path, accelerate_config="fsdp", resume="latest")
    assert "FSDP2" in out and "resumed from" in out and "at step 1" in out
    assert [line["step"] for line in logged(two)] == [1, 2]
    assert_states_close(lora_of(one), lora_of(two), atol=1e-6, rtol=0)

    from diffalign.backbones.tiny import tiny_pipeline

    def image(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images

    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    base = image(pipe)
    pipe.load_lora_weights(str(Path(two["output_dir"]) / "final"))
    assert abs(image(pipe) - base).max() > 1e-4


@pytest.mark.slow
def test_fsdp_full_finetune_shards_the_reference_and_exports_a_pipeline(tmp_path):
    """Full fine-tuning under FSDP2: the frozen reference is sharded too, the whole model is gathered by
    both ranks for the export (rank 0 writes), and the weights equal one process with the double batch."""
    common = dict(lora=None, optim={**ADAM, "lr": 1e-4})
    one = run(tiny_config(tmp_path / "one", train={"batch_size": 2, "max_steps": 1}, **common))
    two = tiny_config(tmp_path / "fsdp", train={"batch_size": 1, "max_steps": 1}, **common)
    out = launch(two, 2, tmp_path, accelerate_config="fsdp")
    assert "reference: frozen_copy" in out and "FSDP2" in out
    assert_full_export_equals(one, two)


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_zero2_lora_equals_one_process_and_resumes(tmp_path):
    """ZeRO-2 (configs/accelerate/zero2.yaml, DeepSpeed's CPU accelerator over gloo): DeepSpeed owns
    accumulation and the step; a LoRA checkpoint holds the trainable weights only and resumes."""
    common = dict(checkpoint={"every": 1, "keep": 5}, optim=ADAM)
    one = tiny_config(tmp_path / "one", train={"batch_size": 2, "grad_accum": 2, "max_steps": 2}, **common)
    run(one)
    two = tiny_config(tmp_path / "zero2", train={"batch_size": 1, "grad_accum": 2, "max_steps": 2}, **common)
    launch(two, 2, tmp_path, accelerate_config="zero2", env={"DIFFALIGN_TEST_CRASH_AT_STEP": "1"}, expect_fail=True)
    out = launch(two, 2, tmp_path, accelerate_config="zero2", resume="latest")
    assert "ZeRO-2" in out and "at step 1" in out
    assert [line["step"] for line in logged(two)] == [1, 2]
    assert_states_close(lora_of(one), lora_of(two), atol=1e-6, rtol=0)


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_zero3_full_finetune_equals_one_process(tmp_path):
    """ZeRO-3: policy sharded, the frozen reference its own ZeRO-3 engine, the export gathers the weights.
    adam_eps 1e-3: with 1e-4, one of 55,296 entries of a conv weight ended 1.2e-6 off (measured), Adam's
    first update lr * g / (|g| + eps) amplifying the rounding of a gradient entry near eps."""
    common = dict(lora=None, optim={**ADAM, "lr": 1e-4, "adam_eps": 1e-3})
    one = run(tiny_config(tmp_path / "one", train={"batch_size": 2, "max_steps": 1}, **common))
    two = tiny_config(tmp_path / "zero3", train={"batch_size": 1, "max_steps": 1}, **common)
    out = launch(two, 2, tmp_path, accelerate_config="zero3")
    assert "ZeRO-3" in out and "reference: frozen_copy" in out
    assert_full_export_equals(one, two)


def assert_full_export_equals(one, two: dict) -> None:
    """The exported pipeline of run `two` holds the weights of the in-process run `one`, which moved off the
    initial weights by far more than the tolerance (so an export of the initial weights fails)."""
    from diffusers import DiffusionPipeline

    from diffalign.backbones import load_backbone

    reloaded = DiffusionPipeline.from_pretrained(str(Path(two["output_dir"]) / "final")).unet.state_dict()
    mine = one.acc.unwrap_model(one.unet).state_dict()
    initial = load_backbone("tiny:sd").denoiser.state_dict()
    assert max((mine[k] - initial[k]).abs().max().item() for k in mine) > 1e-5
    assert_states_close(mine, reloaded, atol=1e-6, rtol=0)


# ---- the bundled launch configs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_bundled_accelerate_configs_load_with_accelerates_own_classes(name, monkeypatch):
    """Each file parses with accelerate's ClusterConfig, passes `accelerate launch`'s own validation, and
    the environment the launcher would set builds the plugin its strategy names."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    cfg = ClusterConfig.from_yaml_file(str(path))
    want = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP}.get(name, DistributedType.DEEPSPEED)
    assert cfg.distributed_type == want
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "diffalign", "train", "x.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if name == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.transformer_cls_names_to_wrap is None  # the model's own _no_split_modules
    if name.startswith("zero"):
        assert args.use_deepspeed and int(args.zero_stage) == int(name[-1])
        assert args.gradient_accumulation_steps is None  # train.grad_accum decides
        if HAVE_DEEPSPEED:
            from accelerate.utils import DeepSpeedPlugin
            from accelerate.utils.launch import prepare_deepspeed_cmd_env

            # as accelerate's launch_command does before its DeepSpeed launcher
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            _, env = prepare_deepspeed_cmd_env(args)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            plugin = DeepSpeedPlugin()
            assert plugin.zero_stage == int(name[-1])
            assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert cfg.mixed_precision == "no"  # train.mixed_precision decides


def test_fsdp_asked_but_not_granted_is_refused(tmp_path):
    """On CPU accelerate turns an FSDP launch into DDP; diffalign says so instead of training unsharded."""
    from accelerate.state import AcceleratorState

    from diffalign.config import ConfigError, load_config
    from diffalign.training.trainer import Trainer

    mp = pytest.MonkeyPatch()
    mp.setenv("ACCELERATE_USE_FSDP", "true")
    try:
        with pytest.raises(ConfigError, match="asked for FSDP"):
            Trainer(load_config(tiny_config(tmp_path)))
    finally:
        mp.undo()
        AcceleratorState._reset_state(True)


def test_the_documented_multi_machine_launch_passes_accelerates_validation():
    """The two-machine command of docs/scaling.md, as accelerate's launcher parses and validates it."""
    import re
    import shlex

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    doc = (ROOT / "docs" / "scaling.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", doc, re.S) if "--num_machines" in b)
    command = " ".join(line.split("#")[0].rstrip().rstrip("\\") for line in block.splitlines())
    argv = shlex.split(command)
    assert argv[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args([a.replace("CONFIG", "x.yaml") for a in argv[2:]])
    args.config_file = str(ROOT / args.config_file)
    args, _, _ = _validate_launch_command(args)
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 0)
    assert args.main_process_ip == "10.0.0.1" and args.use_fsdp and args.module


def test_accumulation_counts_micro_steps_not_batches_read(tmp_path, monkeypatch):
    """A batch with nothing to learn (SPO: no kept pair) is read again for the same micro-step. accelerate
    decides the sync (and whether the prepared optimizer steps at all) from how many micro-batches it has
    entered, so that count must follow the micro-steps: here every step's first batch is empty, and each of
    the 3 steps must still be an optimizer step."""
    from diffalign.training.trainer import Trainer

    original = Trainer.compute_loss
    calls = {"n": 0}

    def every_third_empty(self, batch, micro):
        calls["n"] += 1
        return None if calls["n"] % 3 == 1 else original(self, batch, micro)

    monkeypatch.setattr(Trainer, "compute_loss", every_third_empty)
    trainer = run(tiny_config(tmp_path, train={"batch_size": 1, "grad_accum": 2, "max_steps": 3}))
    assert trainer.counters["empty_batches"] == 3
    steps = {int(s["step"]) for s in trainer.optimizer.optimizer.state.values()}
    assert steps == {3}  # AdamW stepped once per optimizer step


@pytest.mark.parametrize("pretrained", ["tiny:sd", "tiny:sdxl"])
def test_a_rank_without_a_usable_item_runs_the_forward_passes_on_a_placeholder(tmp_path, pretrained):
    """Under FSDP / ZeRO-3 every forward is a collective, so a rank whose micro-batch held no usable item
    runs the policy and reference on a placeholder item: a finite zero loss whose backward reaches every
    trainable parameter with a zero gradient, and which ran the denoiser (counted forwards)."""
    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    trainer = Trainer(load_config(tiny_config(tmp_path, model={"pretrained": pretrained})))
    calls = []
    hook = trainer.backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    loss = trainer._zero_loss()
    hook.remove()
    assert len(calls) == 2  # policy and reference (adapters off)
    assert torch.isfinite(loss) and loss.item() == 0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in trainer.params)
