"""References as modules: each kind yields, inside `with reference.model(policy) as ref:`, the module the
reference energies (or generated candidates) come from, or None.

- `none`: reference-free objectives (MaPO, SFT).
- `lora_off`: the policy is base + LoRA; switching the adapters off gives the base model bit for bit, with
  no second copy. The switch is made on the inner module, but the forward runs through the prepared
  (wrapped) policy, so a distributed wrapper sees every call.
- `frozen_copy`: a frozen duplicate of the denoiser taken before training (full fine-tuning).
- `pool`: a checkpoint pool: earlier checkpoints of this run, one drawn per step (SePPO's Random
  Checkpoint Replay). Draws are keyed on (seed, step), so resume and N processes replay them.

Every reference hears about each optimizer step (`on_step`) and each saved checkpoint (`on_checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """diffusers' disable_adapters / enable_adapters as a context (they are plain methods)."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


class Reference:
    name = "none"

    def to(self, device) -> Reference:
        return self

    @contextlib.contextmanager
    def model(self, policy: nn.Module) -> Iterator[nn.Module | None]:
        yield None

    def on_step(self, step: int) -> None:
        """Called after each optimizer step (and once with the starting step before training)."""

    def on_checkpoint(self, path, step: int) -> None:
        """Called after a checkpoint at `path` was completed."""

    def describe(self) -> str:
        return self.name


class AdapterOffReference(Reference):
    name = "lora_off"

    def __init__(self, unwrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.unwrap = unwrap

    @contextlib.contextmanager
    def model(self, policy):
        with adapters_disabled(self.unwrap(policy)):
            yield policy


class FrozenCopyReference(Reference):
    name = "frozen_copy"

    def __init__(self, denoiser: nn.Module, dtype: torch.dtype | None = None):
        self.module = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if dtype is not None and next(self.module.parameters()).dtype != dtype:  # diffusers warns on any cast
            self.module.to(dtype)

    def to(self, device) -> FrozenCopyReference:
        self.module.to(device)
        return self

    @contextlib.contextmanager
    def model(self, policy):
        yield self.module


REFERENCE_KINDS = ("auto", "lora_off", "frozen_copy")


def make_reference(kind: str, needs_reference: bool, has_lora: bool, denoiser: nn.Module, dtype=None,
                   unwrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> Reference:  # fmt: skip
    if not needs_reference:
        return Reference()
    if kind == "auto":
        kind = "lora_off" if has_lora else "frozen_copy"
    if kind == "lora_off":
        return AdapterOffReference(unwrap)
    if kind == "frozen_copy":
        return FrozenCopyReference(denoiser, dtype)
    raise ValueError(f"unknown reference kind {kind!r}; choose one of {REFERENCE_KINDS}")
