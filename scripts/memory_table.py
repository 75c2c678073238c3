#!/usr/bin/env python
"""Memory arithmetic per GPU for SDXL, SD3.5-Large and FLUX.1-dev under each distributed strategy
(docs/scaling.md prints its output).

    python scripts/memory_table.py              # 8 GPUs, LoRA rank 64
    python scripts/memory_table.py --gpus 16 --rank 32

Where the numbers come from: every model is built on the meta device (no weights, no download) from the
architecture in its published config.json (copied below, only the fields that set sizes), and its
parameters are counted; LoRA counts are rank x (in + out) over the attention projections to_q, to_k, to_v,
to_out.0 (diffalign's default targets for SD/SDXL; the same names exist in SD3 and FLUX blocks). The bytes
per parameter are the precision arithmetic stated in the table's legend. Activations are NOT in this
table: they depend on resolution, batch, attention kernel and checkpointing, and are measured on a GPU.
"""

from __future__ import annotations

import argparse

GB = 1024**3

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[320, 640, 1280],
    layers_per_block=2, transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")  # fmt: skip
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
              hidden_act="gelu")  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def meta(build):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    if hasattr(model, "tie_weights"):  # T5: the encoder's embedding is the shared one, as when loaded
        model.tie_weights()
    return model


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lora_count(model, rank: int) -> int:
    import torch

    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS))  # fmt: skip


def largest_unit(model) -> int:
    """Parameters of the largest FSDP unit: a block of the model's _no_split_modules (the wrap policy of
    configs/accelerate/fsdp.yaml), without those of the units nested in it (gathered on their own)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    inner = {id(p) for u in units for sub in u.modules() if sub is not u and type(sub).__name__ in names
             for p in sub.parameters()}  # fmt: skip
    sizes = [sum(p.numel() for p in u.parameters() if id(p) not in inner) for u in units]
    return max(sizes) if sizes else 0


def families():
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(cfg):
        return meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)))

    def vae(latent):
        return meta(lambda: AutoencoderKL(latent_channels=latent, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                          down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4))  # fmt: skip

    t5 = meta(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    return {
        "SDXL": (meta(lambda: UNet2DConditionModel(**SDXL_UNET)), [clip(CLIP_L), clip(CLIP_G), vae(4)]),
        "SD3.5-Large": (meta(lambda: SD3Transformer2DModel(**SD35_LARGE)), [clip(CLIP_L), clip(CLIP_G), t5, vae(16)]),
        "FLUX.1-dev": (meta(lambda: FluxTransformer2DModel(**FLUX_DEV)), [clip(CLIP_L), t5, vae(16)]),
    }


def rows(P: int, L: int, U: int, F: int, n: int):
    """(strategy, LoRA GiB, full GiB) per GPU for denoiser params P, LoRA params L, largest unit U, frozen
    encoders F, on n GPUs. Bytes: frozen base and reference bf16 (2); trainable fp32 weights (4) + fp32
    gradients (4) + AdamW m and v (8); a sharded unit is gathered in bf16 for its forward (+ one prefetched)."""
    enc = 2 * F
    lora_train = 16 * L
    gathered = 2 * 2 * U
    return [
        ("DDP", 2 * P + lora_train + enc, 16 * P + 2 * P + enc),
        ("ZeRO-2", 2 * P + 4 * L + 12 * L / n + enc, 4 * P + 12 * P / n + 2 * P + enc),
        ("FSDP / ZeRO-3", 2 * P / n + 16 * L / n + gathered + enc, 16 * P / n + 2 * P / n + gathered + enc),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args()
    print(f"per GPU, {args.gpus} GPUs, LoRA rank {args.rank}; weights + gradients + AdamW state + frozen text encoders "
          "and VAE (bf16); activations not included")  # fmt: skip
    print("| model | denoiser params | LoRA params | largest unit | encoders + VAE | strategy | LoRA GiB | full FT GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (den, frozen) in families().items():
        P, L, U, F = count(den), lora_count(den, args.rank), largest_unit(den), sum(count(m) for m in frozen)
        for i, (strategy, lora, full) in enumerate(rows(P, L, U, F, args.gpus)):
            head = f"| {name} | {P / 1e9:.2f} B | {L / 1e6:.0f} M | {U / 1e6:.0f} M | {F / 1e9:.2f} B" if i == 0 else "| | | | |"
            print(f"{head} | {strategy} | {lora / GB:.1f} | {full / GB:.1f} |")


if __name__ == "__main__":
    main()
