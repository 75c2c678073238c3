"""Tiny random Stable Diffusion, SD3 and FLUX components, built in code in milliseconds and without the
network.

They have the real architectures (diffusers UNet2DConditionModel, SD3Transformer2DModel,
FluxTransformer2DModel, AutoencoderKL, transformers CLIP and T5 text encoders, a real CLIPTokenizer and
T5TokenizerFast over a character vocabulary) at toy widths, so tests and tiny recipes run the same code
paths as full-size models. `save_tiny_pipeline` writes one as a diffusers folder, so the real
`from_pretrained` loaders are exercised on local files.
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


# ---- flow-matching transformers (SD3 / SD3.5, FLUX.1) ------------------------------------------------

#: the character vocabulary of the tiny T5 tokenizer (ids: <pad> 0, </s> 1, <unk> 2, then pieces)
T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def tiny_t5_tokenizer(max_length: int = 512):
    """A real T5TokenizerFast (Unigram) whose pieces are single characters, with and without the word-start
    mark: every prompt tokenizes, offline. Ends each prompt with </s> and pads with <pad>, as T5's does."""
    from transformers import T5TokenizerFast

    vocab = [(t, 0.0) for t in T5_SPECIAL] + [("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in _CHARS if c != " "] + [("\u2581" + c, -1.5) for c in _CHARS if c != " "]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(d_model: int = 64, seed: int = 0, vocab_size: int | None = None, **sizes):
    """A T5 v1.1-style encoder (gated GELU feed-forward) at toy width."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size or len(tiny_t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                  num_layers=2, num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                  dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0) | sizes  # fmt: skip
    return T5EncoderModel(T5Config(**config)).eval()


def flow_vae(seed: int = 0, scaling_factor: float = 1.5305, shift_factor: float = 0.0609,
             block_out_channels=(16, 32), latent_channels: int = 16, **kw):  # fmt: skip
    """The SD3 / FLUX VAE layout (16 latent channels, a shift factor, no quant convs), by default at toy
    width; SD3's scaling and shift factors by default (FLUX: 0.3611, 0.1159)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                         latent_channels=latent_channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False,
                         **({"layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32} | kw)).eval()  # fmt: skip


def flow_scheduler(shift: float = 3.0, dynamic: bool = False):
    """FlowMatchEulerDiscreteScheduler as SD3 (shift 3) or FLUX.1-dev (dynamic shifting) configure it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)  # fmt: skip
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def tiny_sd3_components(seed: int = 0, t5: bool = True) -> dict:
    """Components of a StableDiffusion3Pipeline at toy width, in SD3.5-Medium's layout (RMS qk-norm, a
    dual-attention first layer): CLIP-L and CLIP-G stand-ins (hidden 32, projection 32, so the pooled
    conditioning is 64 wide), a T5 stand-in of width 64 = the transformer's joint_attention_dim (>= the
    concatenated CLIP width, as in SD3: 2048 <= 4096), the 16-channel VAE, shift-3 flow scheduler.
    t5=False leaves text_encoder_3 out (the pipeline then feeds zeros)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")  # fmt: skip
    return dict(
        transformer=transformer.eval(),
        vae=flow_vae(seed),
        text_encoder=tiny_text_encoder(with_projection=True, seed=seed),
        text_encoder_2=tiny_text_encoder(with_projection=True, seed=seed + 1),
        text_encoder_3=tiny_t5_encoder(64, seed=seed + 2) if t5 else None,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer() if t5 else None,
        scheduler=flow_scheduler(3.0),
    )


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """Components of a FluxPipeline at toy width: CLIP-L stand-in (pooled 32), T5 stand-in (width 64), the
    16-channel VAE with FLUX's factors, a FluxTransformer2DModel (one double and one single block, packed
    2x2 input 64 channels) with the guidance embedding of FLUX.1-dev (guidance_embeds=False: schnell), and
    FLUX.1-dev's dynamically shifted scheduler."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))  # fmt: skip
    return dict(
        transformer=transformer.eval(),
        vae=flow_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=tiny_text_encoder(seed=seed),
        text_encoder_2=tiny_t5_encoder(64, seed=seed + 2),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_t5_tokenizer(),
        scheduler=flow_scheduler(3.0, dynamic=guidance_embeds),
    )


TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux")


def tiny_pipeline(family: str = "sd", seed: int = 0, prediction_type: str = "epsilon", **kwargs):
    """A ready diffusers pipeline of the given family (sd, sdxl, sd3, flux) with tiny random weights;
    kwargs go to the family's components builder (sd3: t5=False; flux: guidance_embeds=False)."""
    import diffusers

    if family == "sd":
        return diffusers.StableDiffusionPipeline(**tiny_sd_components(seed, prediction_type))
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**tiny_sdxl_components(seed, prediction_type))
    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(**tiny_sd3_components(seed, **kwargs))
    if family == "flux":
        return diffusers.FluxPipeline(**tiny_flux_components(seed, **kwargs))
    raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")


def save_tiny_pipeline(path: str | Path, family: str = "sd", seed: int = 0, prediction_type: str = "epsilon",
                       **kwargs) -> Path:  # fmt: skip
    """Write a tiny pipeline as a diffusers folder (model_index.json + components) and return the path."""
    path = Path(path)
    tiny_pipeline(family, seed, prediction_type, **kwargs).save_pretrained(path, safe_serialization=True)
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


def _random_clip(hidden: int, layers: int, heads: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=2 + 2 * len(_CHARS), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, projection_dim=hidden,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="gelu")  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _t5_builder(seed: int, sizes: dict):
    """A function that builds the random T5 (T5's 32,128-token vocabulary) on first use, on the GPU if any."""

    def build():
        with torch.device(_device()):
            return tiny_t5_encoder(seed=seed, vocab_size=32128, **sizes)

    return build


#: SD3-Medium (2.0 B transformer) and a scaled-down layout for CPU benchmarks
_SD3_SIZES = {
    "full": dict(transformer=dict(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                  joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                                  pos_embed_max_size=192),
                 clip=((768, 12, 12), (1280, 32, 20)), t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                                num_heads=64, relative_attention_num_buckets=32),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                          sample_size=1024)),
    "small": dict(transformer=dict(sample_size=32, num_layers=4, attention_head_dim=64, num_attention_heads=4,
                                   joint_attention_dim=512, caption_projection_dim=256, pooled_projection_dim=512,
                                   pos_embed_max_size=64),
                  clip=((256, 4, 4), (256, 4, 4)), t5=dict(d_model=512, d_kv=64, d_ff=1024, num_layers=2,
                                                             num_heads=8, relative_attention_num_buckets=32),
                  vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32,
                           sample_size=256)),
}  # fmt: skip


def random_sd3_components(seed: int = 0, scale: str = "full") -> dict:
    """The SD3-Medium architecture (scale "full": 24 joint layers of width 1536, CLIP-L, CLIP-G, T5-XXL,
    the 16-channel VAE) or its scaled-down layout ("small", for CPU benchmarks), random weights and the
    character tokenizers. Built on the GPU when there is one; T5 comes as `build_t5`, a function, so the
    backbone can hold it lazily as it holds a real one."""
    from diffusers import SD3Transformer2DModel

    sizes = _SD3_SIZES[scale]
    with torch.device(_device()):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, **sizes["transformer"])
        (h1, l1, a1), (h2, l2, a2) = sizes["clip"]
        te1, te2 = _random_clip(h1, l1, a1, True, seed), _random_clip(h2, l2, a2, True, seed + 1)
        vae = flow_vae(seed, **sizes["vae"])

    return dict(transformer=transformer, vae=vae, text_encoder=te1, text_encoder_2=te2,
                build_t5=_t5_builder(seed + 2, sizes["t5"]),
                tokenizer=tiny_tokenizer(77), tokenizer_2=tiny_tokenizer(77), tokenizer_3=tiny_t5_tokenizer(),
                scheduler=flow_scheduler(3.0))  # fmt: skip


#: FLUX.1-dev (11.9 B transformer) and a scaled-down layout for CPU benchmarks
_FLUX_SIZES = {
    "full": dict(transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                  joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
                 clip=(768, 12, 12), t5=_SD3_SIZES["full"]["t5"], vae=_SD3_SIZES["full"]["vae"]),
    "small": dict(transformer=dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                                   joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(8, 28, 28)),
                  clip=(256, 4, 4), t5=_SD3_SIZES["small"]["t5"], vae=_SD3_SIZES["small"]["vae"]),
}  # fmt: skip


def random_flux_components(seed: int = 0, scale: str = "full") -> dict:
    """The FLUX.1-dev architecture (scale "full": 19 double and 38 single blocks of width 3072, guidance
    embedding, CLIP-L, T5-XXL, the 16-channel VAE with FLUX's factors) or its scaled-down layout ("small"),
    random weights; T5 as `build_t5` (see random_sd3_components)."""
    from diffusers import FluxTransformer2DModel

    sizes = _FLUX_SIZES[scale]
    with torch.device(_device()):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **sizes["transformer"])
        te = _random_clip(*sizes["clip"], projection=False, seed=seed)
        vae = flow_vae(seed, scaling_factor=0.3611, shift_factor=0.1159, **sizes["vae"])

    return dict(transformer=transformer, vae=vae, text_encoder=te, build_t5=_t5_builder(seed + 2, sizes["t5"]),
                tokenizer=tiny_tokenizer(77),
                tokenizer_2=tiny_t5_tokenizer(), scheduler=flow_scheduler(3.0, dynamic=True))  # fmt: skip
