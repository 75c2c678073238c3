"""Fused mixed-precision kernels, each beside its plain-torch reference with the same signature.

| fused | reference | what |
|---|---|---|
| `group_norm_silu` | `group_norm_silu_reference` | silu(group_norm(x)), forward and backward, fp32 statistics |
| `per_sample_mse` | `per_sample_mse_reference` | mean over each sample of (pred - target)^2 in fp32 |

A fused function runs its Triton kernel when Triton can (a CUDA tensor, or the interpreter under
`TRITON_INTERPRET=1`) and otherwise its reference, saying why once in the log (`runtime.py`). Triton is
the optional extra `pip install 'diffalign[kernels]'`, imported only when a kernel runs. `TOLERANCES` is
the per-dtype table the parity tests hold the fused kernels to. Backbones apply the kernels to their own
modules (`Backbone.apply_kernels`, via `blocks.fuse_resnet_blocks`).
"""

from diffalign.kernels.energy import per_sample_mse, per_sample_mse_reference
from diffalign.kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference
from diffalign.kernels.runtime import TOLERANCES, describe, fallback_reason

__all__ = [
    "TOLERANCES", "describe", "fallback_reason", "group_norm_silu", "group_norm_silu_reference",
    "per_sample_mse", "per_sample_mse_reference",
]  # fmt: skip
