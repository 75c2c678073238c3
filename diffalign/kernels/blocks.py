"""Fused versions of diffusers blocks, swapped in place by a backbone's `apply_kernels`.

`fuse_resnet_blocks(module)` changes the class of every diffusers `ResnetBlock2D` under `module` whose
layout it knows (GroupNorm norms with affine weights, SiLU, `time_embedding_norm="default"`: every resnet
block of the SD / SDXL UNets and their VAEs) to `FusedResnetBlock2D`, whose forward is diffusers' step for
step with each GroupNorm -> SiLU pair computed by the fused kernel. Swapping the forward (rather than
replacing `norm1`/`norm2` and `nonlinearity` with modules) keeps the SiLU the block applies to the time
embedding exactly where it was, and leaves parameters, their names and the state dict unchanged, so
LoRA targets, checkpoints and exports are the same with kernels on or off. Blocks of any other layout are
left alone and counted.
"""

from __future__ import annotations

from torch import nn

from diffalign.kernels.group_norm_silu import group_norm_silu

try:  # diffusers is a core dependency; the guard only keeps this module importable without it
    from diffusers.models.resnet import ResnetBlock2D
except ImportError:  # pragma: no cover
    ResnetBlock2D = None


def _plain_group_norm(m) -> bool:
    return type(m) is nn.GroupNorm and m.affine


def fusable(block: nn.Module) -> bool:
    """A diffusers ResnetBlock2D of the layout FusedResnetBlock2D computes."""
    return (type(block) is ResnetBlock2D and _plain_group_norm(block.norm1) and _plain_group_norm(block.norm2)
            and type(block.nonlinearity) is nn.SiLU and block.time_embedding_norm == "default")  # fmt: skip


def _norm_silu(norm: nn.GroupNorm, x):
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


if ResnetBlock2D is not None:

    class FusedResnetBlock2D(ResnetBlock2D):
        """diffusers' ResnetBlock2D (time_embedding_norm "default") with fused GroupNorm+SiLU:
        norm1+act -> (up/down-sample) -> conv1 -> + time_emb_proj(act(temb)) -> norm2+act -> dropout ->
        conv2 -> (+ shortcut) / output_scale_factor."""

        def forward(self, input_tensor, temb, *args, **kwargs):
            hidden_states = _norm_silu(self.norm1, input_tensor)
            if self.upsample is not None:
                if hidden_states.shape[0] >= 64:  # as diffusers: nearest upsampling of large NHWC batches fails
                    input_tensor = input_tensor.contiguous()
                    hidden_states = hidden_states.contiguous()
                input_tensor = self.upsample(input_tensor)
                hidden_states = self.upsample(hidden_states)
            elif self.downsample is not None:
                input_tensor = self.downsample(input_tensor)
                hidden_states = self.downsample(hidden_states)
            hidden_states = self.conv1(hidden_states)
            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)[:, :, None, None]
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = _norm_silu(self.norm2, hidden_states)
            hidden_states = self.dropout(hidden_states)
            hidden_states = self.conv2(hidden_states)
            if self.conv_shortcut is not None:
                if self.training:  # as diffusers: avoids DDP's gradient-stride warning
                    input_tensor = input_tensor.contiguous()
                input_tensor = self.conv_shortcut(input_tensor)
            return (input_tensor + hidden_states) / self.output_scale_factor


def fuse_resnet_blocks(module: nn.Module | None) -> tuple[int, int]:
    """Swap every fusable ResnetBlock2D under `module` to FusedResnetBlock2D, in place.
    Returns (fused, left alone): the resnet blocks now fused (including earlier calls) and those of
    another layout."""
    if module is None or ResnetBlock2D is None:
        return 0, 0
    fused = other = 0
    for m in module.modules():
        if fusable(m):
            m.__class__ = FusedResnetBlock2D
        if isinstance(m, FusedResnetBlock2D):
            fused += 1
        elif isinstance(m, ResnetBlock2D):
            other += 1
    return fused, other
