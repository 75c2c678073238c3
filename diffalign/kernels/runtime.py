"""Which path a kernel call takes, the tolerance table its parity tests use, and the one message a fallback
gives.

A fused kernel runs through Triton when Triton imports and the tensor is on a CUDA device, or when
`TRITON_INTERPRET=1` was set before Triton was imported (the interpreter runs Triton on CPU tensors: slow,
for tests). Otherwise its plain-torch reference runs, and the reason is logged once.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("diffalign.kernels")

INSTALL_HINT = "pip install 'diffalign[kernels]'"

#: How far a fused kernel may be from its plain-torch reference run at the same dtype, for values and for
#: gradients (torch.testing.assert_close's atol / rtol). fp32 differs only by summation order; bf16 and
#: fp16 results are rounded once to the output dtype by both paths, so they may differ by a unit in the
#: last place, and a reduction over the block (the GroupNorm gradients) by a little more.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}

#: dtypes the fused kernels take; others (float64, ...) run the reference
FUSED_DTYPES = tuple(TOLERANCES)


@functools.cache
def load_triton():
    """The triton module, or None when it does not import (the `kernels` extra is not installed)."""
    try:
        import triton
    except Exception:  # ImportError, or a broken install that fails on import
        return None
    return triton


def interpreting() -> bool:
    """Triton's interpreter is on (it must have been set before triton was imported to take effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fallback_reason(device: torch.device | str) -> str | None:
    """Why a kernel on `device` would run its plain-torch reference, or None when Triton runs it."""
    device = torch.device(device)
    if load_triton() is None:
        return f"triton is not installed ({INSTALL_HINT})"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"no CUDA device (on {device.type}; TRITON_INTERPRET=1 runs the kernels on a CPU, slowly)"


def describe(device: torch.device | str) -> str:
    """One line for a run summary: which path the fused kernels take on `device`, and why."""
    reason = fallback_reason(device)
    if reason is not None:
        return f"plain-torch reference path: {reason}"
    if torch.device(device).type == "cuda":
        return "Triton on CUDA"
    return "Triton interpreter on CPU (TRITON_INTERPRET=1: correct but slow)"


_said: set[str] = set()


def use_triton(x: torch.Tensor, name: str) -> bool:
    """True when kernel `name` runs through Triton for tensor x; else logs the reason once (per reason)."""
    return x.dtype in FUSED_DTYPES and _triton_runs(x.device.type, name)


@torch.compiler.assume_constant_result  # a fact of the machine: torch.compile decides once, when it traces
def _triton_runs(device_type: str, name: str) -> bool:
    reason = fallback_reason(device_type)
    if reason is None:
        return True
    if reason not in _said:
        _said.add(reason)
        log.warning("diffalign kernels: %s; %s and the other fused kernels use their plain-torch reference", reason, name)
    return False
