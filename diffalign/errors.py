"""Known failures: one line naming the file, key or id and the fix, exit status 2; a traceback only with
`--debug` (or DIFFALIGN_DEBUG=1).

Code that meets a problem the user can fix raises `UserError` (or a subclass: `ConfigError`,
`DataFormatError`, ...) with a message that says what and where; every `diffalign` subcommand's entry point
is wrapped in `cli_entry`, which turns it into that line. Anything else is a bug and keeps its traceback.
The checks here are shared by the places that read files diffalign wrote (checkpoints, caches, LoRAs).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG_FLAG = "--debug"


class UserError(Exception):
    """A failure the user can fix; its message names the file / key / id and the fix."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the run needs does not exist."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, feature: str):
    """Import `module` for `feature`, or raise MissingExtra naming `pip install 'diffalign[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{feature} needs {module}, which is not installed: pip install 'diffalign[{extra}]' "
                           f"(or switch the feature off)") from err  # fmt: skip


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("DIFFALIGN_DEBUG", "") not in ("", "0")


def cli_entry(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Wrap a subcommand's `main(argv) -> int`: `--debug` anywhere in argv is taken out (it re-raises),
    and a UserError becomes `prog: message` on stderr with exit status 2."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def entry(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(argv)
            argv = [a for a in argv if a != DEBUG_FLAG]
            try:
                return int(main(argv) or 0)
            except UserError as err:
                if debug:
                    raise
                print(f"{prog}: {err}", file=sys.stderr)
                return 2

        entry.is_cli_entry = True  # diffalign.cli wraps the subcommands that are not wrapped yet
        return entry

    return wrap


# ---- files diffalign wrote, read back ------------------------------------------------------------------


def check_safetensors(path: str | Path, fix: str) -> None:
    """Raise UserError naming `path` and `fix` unless it is a complete safetensors file (header and the
    byte length its header promises; the tensors themselves are not read)."""
    import json
    import struct

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError("the header is cut off")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, but its header describes {8 + n + end}")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (ValueError, KeyError, TypeError, OSError, struct.error) as err:
        raise UserError(f"{path} is truncated or not a safetensors file ({err}); {fix}") from None


def check_torch_archive(path: str | Path, fix: str) -> None:
    """Raise UserError naming `path` unless it is a complete torch.save zip archive (its central directory
    is at the end of the file, so a cut-off file fails here without being unpickled)."""
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"{path} is truncated or not a torch archive ({err}); {fix}") from None
