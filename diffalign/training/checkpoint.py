"""Atomic checkpoints: a checkpoint directory appears under its final name only when complete, and the
`latest` pointer is replaced atomically after it, so a crash while saving never leaves a broken latest.

What a checkpoint holds and how each file is read back (docs/training.md, "Checkpoints"):
- diffalign's own files are safetensors or JSON: `trainer_state.json`, the LoRA weights `lora_0.safetensors`,
  the EMA weights `ema.safetensors` with its counters in `ema.json`;
- accelerate's files: `model.safetensors` (full fine-tuning), and torch archives `optimizer.bin`,
  `scheduler.bin`, `scaler.pt` (fp16), `random_states_<rank>.pkl`, which accelerate loads with
  `torch.load(weights_only=True)` (numpy arrays and dtypes allow-listed for the RNG states). Nothing is
  registered with accelerate's `register_for_checkpointing`, whose `custom_checkpoint_*.pkl` files it
  unpickles with `weights_only=False`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffalign.atomic import write_atomic
from diffalign.errors import MissingFile, UserError, check_safetensors, check_torch_archive

LATEST = "latest"
STATE_FILE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
EMA_STATE = "ema.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def finalize(tmp_dir: Path, final_dir: Path, state: dict, keep: int) -> None:
    """Write the trainer state into tmp_dir, move it to final_dir, point `latest` at it, prune old ones:
    of the checkpoints before this one, the newest keep - 1 stay. The new one is never pruned, nor any with
    a higher step (left by a history this run did not continue; never ours to delete)."""
    (tmp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    write_atomic(final_dir.parent / LATEST, final_dir.name)
    done = [p for p in final_dir.parent.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    older = sorted((p for p in done if _step_of(p) < _step_of(final_dir)), key=_step_of)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


#: what a run writes into its output_dir (the latent cache, output_dir/cache, is not the run's)
RUN_OUTPUTS = ("checkpoints", "final", "logs", "validation", "config.yaml")


def check_new_run(output_dir: str | Path, resume: str | None, overwrite: bool, delete: bool = True) -> list[str]:
    """A run without --resume must not write into a folder that holds another run's checkpoints or export
    (its checkpoints would be pruned by name among the other run's, its export would replace the other's).
    With overwrite, the other run's outputs are deleted first (when `delete`: one process does it); returns
    what was deleted."""
    out = Path(output_dir)
    root = checkpoint_root(out)
    held = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
    if resume is not None or not (held or (out / "final").is_dir()):
        return []
    if not overwrite:
        what = f"checkpoints up to {held[-1]}" if held else "an exported final/ model"
        raise UserError(f"{out} already holds a run ({what}); continue it with --resume latest, use another "
                        "output_dir (--output-dir DIR), or pass --overwrite to delete it and start over")  # fmt: skip
    removed = []
    if not delete:
        return removed
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(str(p))
    return removed


def find_resume(output_dir: str | Path, resume: str | None, objective: dict, log=print) -> Path | None:
    """The checkpoint `--resume` names, verified: None to start fresh (no --resume, or `latest` with no
    checkpoint yet, which is said). A missing folder is a MissingFile error; a checkpoint trained under
    another objective (or other objective parameters) is resumed with a warning."""
    if resume is None:
        return None
    if resume != LATEST and not Path(resume).exists():
        raise MissingFile(f"--resume {resume}: no such checkpoint folder; give --resume latest or a folder such "
                          f"as {checkpoint_root(output_dir) / 'step-0000100'}")  # fmt: skip
    path = resolve(output_dir, resume)
    if path is None:
        log(f"--resume latest: no checkpoint in {checkpoint_root(output_dir)} yet: starting fresh")
        return None
    before = read_state(path).get("objective")
    if before is not None and before != objective:
        import logging

        logging.getLogger(__name__).warning(
            "warning: %s was trained with objective %s; this run continues it with objective %s", path,
            _describe_objective(before), _describe_objective(objective))  # fmt: skip
    return path


def _describe_objective(objective: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in objective.items() if k != "name")
    return f"{objective.get('name')} ({params})"


def resolve(output_dir: str | Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none yet); else a path. The folder is
    checked (verify) before anything in it is loaded."""
    if resume == LATEST:
        pointer = checkpoint_root(output_dir) / LATEST
        if not pointer.is_file():
            return None
        path = checkpoint_root(output_dir) / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise MissingFile(f"{path} is not a complete diffalign checkpoint (no {STATE_FILE}); resume from a complete one "
                          "(--resume latest takes the newest) or start over without --resume")  # fmt: skip
    verify(path)
    return path


def verify(path: Path) -> None:
    """Refuse a checkpoint folder with a truncated file (named) or a pickle accelerate would run."""
    fix = "resume from another checkpoint (--resume PATH) or start over without --resume"
    pickled = sorted(path.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise UserError(f"{pickled[0]} is a pickled state (an EMA state from an earlier diffalign, or not written by "
                        f"diffalign) that could run code when loaded, so diffalign does not read it; {fix}")  # fmt: skip
    try:
        json.loads((path / STATE_FILE).read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{path / STATE_FILE} is unreadable ({err}); {fix}") from None
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            check_safetensors(f, fix)
        elif f.suffix in (".bin", ".pt", ".pkl"):
            check_torch_archive(f, fix)
            check_loadable_globals(f, fix)


def check_loadable_globals(path: Path, fix: str) -> None:
    """A torch archive accelerate will load with weights_only=True must name no other Python callables
    than the weights-only unpickler's and accelerate's allow-list (numpy arrays and dtypes for the RNG
    states): read from its pickle without running it, so a planted file is named here instead of failing
    (or, for the RNG states, being skipped silently) inside accelerate."""
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = {f"{g.__module__}.{g.__qualname__}" for g in TORCH_SAFE_GLOBALS}
    unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - allowed)
    if unsafe:
        raise UserError(f"{path} would call {', '.join(unsafe[:3])} when loaded, which the weights-only loader "
                        f"refuses (not written by diffalign or accelerate, or tampered with); {fix}")  # fmt: skip


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


# ---- EMA (diffusers' EMAModel) as safetensors + JSON -----------------------------------------------------


def save_ema(ema, folder: str | Path) -> None:
    """The EMA's shadow weights as `ema.safetensors` (shadow.<i>, in parameter order) and its counters
    (decay, optimization_step, ...) as `ema.json`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = dict(ema.state_dict())
    shadow = state.pop("shadow_params")
    save_file({f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(folder / EMA_WEIGHTS))
    (folder / EMA_STATE).write_text(json.dumps(state, indent=2))


def load_ema(ema, folder: str | Path) -> None:
    """Restore what save_ema wrote, in place (the shadow weights keep their device and dtype)."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    fix = "resume from another checkpoint, or set train.ema_decay=0"
    if not (folder / EMA_WEIGHTS).is_file():
        raise UserError(f"{folder} holds no EMA state ({EMA_WEIGHTS}) but train.ema_decay is set; {fix}")
    check_safetensors(folder / EMA_WEIGHTS, fix)
    tensors = load_file(str(folder / EMA_WEIGHTS))
    want = {f"shadow.{i}": tuple(p.shape) for i, p in enumerate(ema.shadow_params)}
    if {k: tuple(v.shape) for k, v in tensors.items()} != want:
        raise UserError(f"{folder / EMA_WEIGHTS} does not match this model's trainable weights; {fix}")
    with torch.no_grad():
        for i, p in enumerate(ema.shadow_params):
            p.copy_(tensors[f"shadow.{i}"])
    ema.load_state_dict(json.loads((folder / EMA_STATE).read_text()))
