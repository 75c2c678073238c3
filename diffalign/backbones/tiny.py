"""Tiny random Stable Diffusion components, built in code in milliseconds and without the network.

They have the real architectures (diffusers UNet2DConditionModel, AutoencoderKL, transformers CLIP text
encoders, a real CLIPTokenizer over a character vocabulary) at toy widths, so tests and tiny recipes run
the same code paths as full-size models. `save_tiny_pipeline` writes one as a diffusers folder, so the
real `from_pretrained` loaders are exercised on local files.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_MAX_LENGTH = 32  # tokenizer context of the tiny text encoders
_CHARS = string.ascii_lowercase + string.digits + " .,!?'-"


def tiny_tokenizer(max_length: int = TINY_MAX_LENGTH):
    """A real CLIPTokenizer whose vocabulary is single characters (no merges): every prompt tokenizes."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        for piece in (c, c + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def tiny_text_encoder(hidden: int = 32, with_projection: bool = False, projection_dim: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(_CHARS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def tiny_unet(sdxl: bool = False, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    if sdxl:
        return UNet2DConditionModel(
            **common,
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
        )
    return UNet2DConditionModel(**common, cross_attention_dim=32)


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Components of a StableDiffusionPipeline (SD1.5/2.x layout)."""
    return dict(
        unet=tiny_unet(seed=seed),
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_tokenizer(),
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Components of a StableDiffusionXLPipeline: two text encoders (the second with projection)."""
    return dict(
        unet=tiny_unet(sdxl=True, seed=seed),
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(seed=seed),
        text_encoder_2=tiny_text_encoder(with_projection=True, seed=seed + 1),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        scheduler=tiny_scheduler(prediction_type),
    )


def tiny_pipeline(family: str = "sd", seed: int = 0, prediction_type: str = "epsilon"):
    """A ready diffusers pipeline of the given family ("sd" or "sdxl") with tiny random weights."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd":
        return StableDiffusionPipeline(**tiny_sd_components(seed, prediction_type))
    if family == "sdxl":
        return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, prediction_type))
    raise ValueError(f"unknown tiny family {family!r}; expected 'sd' or 'sdxl'")


def save_tiny_pipeline(path: str | Path, family: str = "sd", seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny pipeline as a diffusers folder (model_index.json + components) and return the path."""
    path = Path(path)
    tiny_pipeline(family, seed, prediction_type).save_pretrained(path, safe_serialization=True)
    return path


# ---- full-size architectures with random weights (timing and memory benchmarks; nothing to download) ----


def random_sdxl_components(seed: int = 0) -> dict:
    """SDXL-base-1.0 architecture (2.6 B-parameter UNet, CLIP-L + OpenCLIP-bigG text encoders, 4-channel
    VAE) with random weights and the character tokenizer: real sizes and shapes for speed/memory work.
    Built on the GPU when there is one (initialising 3 B parameters on a CPU takes minutes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    common = dict(vocab_size=2 + 2 * len(_CHARS), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                  pad_token_id=1, hidden_act="gelu")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
        )
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768, **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         projection_dim=1280, **common))
    return dict(unet=unet, vae=vae.eval(), text_encoder=te1.eval(), text_encoder_2=te2.eval(),
                tokenizer=tiny_tokenizer(77), tokenizer_2=tiny_tokenizer(77), scheduler=tiny_scheduler())
