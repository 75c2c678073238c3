"""The GenEval image-folder layout, used for every suite.

    <root>/<index:05d>/metadata.jsonl        one JSON object (despite the name): the prompt's metadata
    <root>/<index:05d>/samples/<k:04d>.png   image k of that prompt

The official GenEval evaluator reads any all-digit folder name and any `<digits>.png` file, so folders
written here can be scored by the official scripts, and folders written by the official generator (which
names images `<k:05d>.png`) can be read here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from diffalign.atomic import write_atomic

_IMAGE_RE = re.compile(r"^\d+\.png$")


class LayoutError(ValueError):
    """A folder that is not in the expected layout."""


def prompt_dir(root: str | Path, index: int) -> Path:
    return Path(root) / f"{index:05d}"


def sample_path(root: str | Path, index: int, k: int) -> Path:
    return prompt_dir(root, index) / "samples" / f"{k:04d}.png"


def write_metadata(root: str | Path, index: int, metadata: dict) -> Path:
    d = prompt_dir(root, index)
    (d / "samples").mkdir(parents=True, exist_ok=True)
    path = d / "metadata.jsonl"
    text = json.dumps(metadata)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_atomic(path, text)
    return path


@dataclass
class PromptFolder:
    index: int
    metadata: dict
    images: list[Path]  # sorted by sample number

    @property
    def prompt(self) -> str:
        return self.metadata["prompt"]


def sample_number(path: Path) -> int:
    return int(Path(path).stem)


def read_layout(root: str | Path, require_metadata: bool = True) -> list[PromptFolder]:
    """All prompt folders under root, sorted by index. Raises LayoutError with a hint when the folder
    does not follow the layout."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"image folder {str(root)!r} does not exist")
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = sub / "metadata.jsonl"
        if meta_path.is_file():
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        elif require_metadata:
            raise LayoutError(f"{str(sub)!r} has no metadata.jsonl (expected <index:05d>/metadata.jsonl)")
        else:
            metadata = {}
        samples = sub / "samples"
        images = sorted((p for p in samples.iterdir() if p.is_file() and _IMAGE_RE.match(p.name)), key=sample_number) if samples.is_dir() else []
        out.append(PromptFolder(int(sub.name), metadata, images))
    if not out:
        raise LayoutError(
            f"{str(root)!r} is not in the GenEval layout: expected folders named by index "
            "(<index:05d>/metadata.jsonl and <index:05d>/samples/<k:04d>.png)"
        )
    return out
