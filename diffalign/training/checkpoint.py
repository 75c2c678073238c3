"""Atomic checkpoints: a checkpoint directory appears under its final name only when complete, and the
`latest` pointer is replaced atomically after it, so a crash while saving never leaves a broken latest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffalign.atomic import write_atomic

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def finalize(tmp_dir: Path, final_dir: Path, state: dict, keep: int) -> None:
    """Write the trainer state into tmp_dir, move it to final_dir, point `latest` at it, prune old ones."""
    (tmp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    write_atomic(final_dir.parent / LATEST, final_dir.name)
    done = sorted(p for p in final_dir.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(output_dir: str | Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none yet); else a path."""
    if resume == LATEST:
        pointer = checkpoint_root(output_dir) / LATEST
        if not pointer.is_file():
            return None
        path = checkpoint_root(output_dir) / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete diffalign checkpoint (no {STATE_FILE})")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())
