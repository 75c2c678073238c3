"""Where reference energies come from.

- adapters off: the policy is base + LoRA; switching the adapters off gives the base model bit for bit,
  with no second copy. Always done on the unwrapped module (a DDP wrapper has no disable_adapters).
- frozen copy: a frozen duplicate of the denoiser taken before training (full fine-tuning).
- none: reference-free objectives (MaPO, SFT).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from diffalign.backbones import Backbone


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


class Reference:
    name = "none"

    def to(self, device) -> Reference:
        return self

    def energies(self, backbone: Backbone, policy: nn.Module, x0, noise, t, cond) -> torch.Tensor | None:
        return None


class AdapterOffReference(Reference):
    name = "lora_off"

    @torch.no_grad()
    def energies(self, backbone, policy, x0, noise, t, cond):
        with adapters_disabled(policy):
            return backbone.energies(policy, x0, noise, t, cond)


class FrozenCopyReference(Reference):
    name = "frozen_copy"

    def __init__(self, denoiser: nn.Module, dtype: torch.dtype | None = None):
        self.model = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if dtype is not None and next(self.model.parameters()).dtype != dtype:  # diffusers warns on any cast
            self.model.to(dtype)

    def to(self, device) -> FrozenCopyReference:
        self.model.to(device)
        return self

    @torch.no_grad()
    def energies(self, backbone, policy, x0, noise, t, cond):
        return backbone.energies(self.model, x0, noise, t, cond)


def make_reference(kind: str, needs_reference: bool, has_lora: bool, denoiser: nn.Module, dtype=None) -> Reference:
    if not needs_reference:
        return Reference()
    if kind == "auto":
        kind = "lora_off" if has_lora else "frozen_copy"
    if kind == "lora_off":
        return AdapterOffReference()
    return FrozenCopyReference(denoiser, dtype)
