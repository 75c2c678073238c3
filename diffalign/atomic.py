"""Files that appear whole or not at all.

Everything diffalign writes where a reader, another process or a rerun after a kill could look goes through
here: the bytes go to a temp file in the same folder, which is then renamed over the final name
(`os.replace`, atomic within one filesystem). So the final name holds the old file or the new one, never
half of one, and a failed write leaves nothing behind. The temp name is hidden, carries the process id
(processes writing the same file do not collide) and keeps the suffix (libraries that choose the format
from it, such as PIL, still do): `folder/.name.tmp-<pid>.ext`, matched by TEMP_GLOB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: what a temp file left by a killed process looks like (for cleaning a folder up)
TEMP_GLOB = ".*.tmp-*"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; write it inside the block. On success it is renamed to `path`;
    on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path


def remove_temps(folder: str | Path) -> None:
    """Delete the temp files a killed writer left in `folder` (call it only when nothing else writes there)."""
    for f in Path(folder).glob(TEMP_GLOB):
        f.unlink(missing_ok=True)
