"""Small shared helpers for the training tests."""

from __future__ import annotations

import torch


def tiny_config(tmp_path, **sections) -> dict:
    cfg = {
        "model": {"pretrained": "tiny:sd"},
        "data": {"format": "pickapic", "source": "builtin:pickapic", "resolution": 32, "builtin_rows": 24},
        "objective": {"name": "dpo"},
        "lora": {"rank": 4},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 2},
        "logging": {"every": 1, "tensorboard": False},
        "checkpoint": {"every": 100},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def run(cfg_dict: dict, resume: str | None = None):
    """Train in-process; returns the trainer (weights, counters, output dir). Every in-process run uses
    mixed_precision "no" (accelerate fixes one per process); other precisions run in a subprocess."""
    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    trainer = Trainer(load_config(cfg_dict), resume=resume)
    trainer.train()
    return trainer


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.acc.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def assert_states_close(a: dict, b: dict, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(
            a[k], b[k], atol=atol, rtol=rtol,
            msg=lambda m, k=k: f"parameter {k} differs: {m}",
        )


def assert_one_process_equals_two(one: dict, two: dict, workdir) -> None:
    """Train `one` in 1 process and `two` in 2 (torchrun): the exported LoRA weights agree (atol 1e-6) and the
    run learned something. Give both optim.adam_eps 1e-4: Adam's first update lr * g / (|g| + eps) turns float
    rounding of a near-zero gradient entry into a visible weight change."""
    from pathlib import Path

    from safetensors.torch import load_file

    launch(one, 1, workdir)
    launch(two, 2, workdir)
    a = load_file(str(Path(one["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(two["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    assert_states_close(a, b, atol=1e-6, rtol=0)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)


def crash_then_resume(cfg_dict: dict, crash_at_step: int, monkeypatch, runner=None):
    """Train until `crash_at_step` optimizer steps are done, die there (as a kill would), then resume from
    the latest checkpoint and train to the end. Returns the resumed trainer. `runner(cfg, resume=)` trains
    (default: `run`)."""
    import pytest

    from diffalign.training.trainer import Trainer

    original = Trainer._optimizer_step

    def crashing(self, batches):
        if self.step == crash_at_step:
            raise KeyboardInterrupt("simulated crash")
        return original(self, batches)

    runner = runner or run
    monkeypatch.setattr(Trainer, "_optimizer_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        runner(cfg_dict)
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    return runner(cfg_dict, resume="latest")


def launch(cfg_dict: dict, nproc: int, workdir, accelerate_config: str | None = None, env: dict | None = None,
           expect_fail: bool = False, resume: str | None = None) -> str:
    """Run `diffalign train` on a config in `nproc` processes: with torchrun (a real gloo DDP group on CPU;
    accelerate's `launch --cpu` would start one process), or with `accelerate launch --config_file
    configs/accelerate/<accelerate_config>.yaml`; with `env` or an accelerate config the entry point is
    tests/cpu_launch.py (FSDP and DeepSpeed on CPU, and the test hooks `env` switches on). Returns stdout; fails the test with the failing rank's own traceback (or, with expect_fail, when the run
    does not fail)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import yaml

    root = Path(__file__).resolve().parents[1]
    path = Path(workdir) / f"{Path(cfg_dict['output_dir']).name}-{nproc}.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    pythonpath = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    module = "tests.cpu_launch" if env or accelerate_config else "diffalign"
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **(env or {})}
    args = ["train", str(path)] + (["--resume", resume] if resume else [])
    if accelerate_config is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "configs" / "accelerate" / f"{accelerate_config}.yaml"), "--num_processes", str(nproc),
               "--main_process_port", "0", "-m", "tests.cpu_launch", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if expect_fail:
        assert proc.returncode != 0, proc.stdout[-2000:]
        return proc.stdout
    if proc.returncode != 0:
        tracebacks = [p for p in proc.stderr.split("Traceback") if "torch/distributed/run.py" not in p]
        pytest.fail(f"{nproc} processes: exit {proc.returncode}\n"
                    + ("Traceback" + tracebacks[-1] if tracebacks else proc.stderr)[-4000:])  # fmt: skip
    assert f"x {nproc} processes" in proc.stdout, proc.stdout[-2000:]
    return proc.stdout


def logged(cfg_dict: dict) -> list[dict]:
    """The metrics.jsonl lines of a run."""
    import json
    from pathlib import Path

    path = Path(cfg_dict["output_dir"]) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
