"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, an MMDiT trained by rectified flow).

Text conditioning as StableDiffusion3Pipeline builds it (`encode_prompt`): the penultimate hidden states
of CLIP-L and CLIP-G concatenated on the feature axis and zero-padded to T5's width, followed on the token
axis by T5-XXL's last hidden states (max_sequence_length tokens, 256 by default); the pooled conditioning
is CLIP-L's and CLIP-G's projected pooled outputs concatenated. T5 may be left out (`model.t5: false`):
its tokens are then zeros, as the pipeline does with text_encoder_3=None. T5 is held lazily
(diffalign/backbones/t5.py): training from the cache never loads it.

Latents are (z - shift_factor) * scaling_factor (the VAE's config); the noise process is rectified flow
with the scheduler's shifted sigma table (diffalign/backbones/processes.py), with timesteps drawn
logit-normal(0, 1) by default, as diffusers' SD3 scripts do. The denoiser is called with t = sigma * 1000.
"""

from __future__ import annotations

import torch
from torch import nn

from diffalign.backbones.base import Conditioning
from diffalign.backbones.sd import StableDiffusionBackbone, module_digest, tokenize
from diffalign.backbones.t5 import LazyModule, lazy_t5_from, t5_states

#: LoRA targets of MMDiT joint attention: the image-stream projections and the context (text-stream) ones;
#: with a name list peft also matches SD3.5's second, image-only attention (attn2.to_q, ...)
MMDIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def dynamic_shift_mu(image_seq_len: int, config: dict, max_shift_default: float) -> float:
    """The `mu` of a dynamically shifted flow schedule: linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as diffusers' `calculate_shift`
    (FluxPipeline's default max_shift is 1.15, StableDiffusion3Pipeline's 1.16)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


class MMDiTBackbone(StableDiffusionBackbone):
    """What SD3 and FLUX share: a transformer trained by rectified flow (timestep density `density` by
    default), LoRA on MMDiT attention exported in peft's keys under `transformer.` (as diffusers' own SD3 and
    FLUX LoRA scripts save them), and a lazily held T5 (`t5`, None when left out) of `max_sequence_length`
    tokens. Subclasses name T5's pipeline slot (`t5_slot`) and build the conditioning."""

    lora_prefix = "transformer"
    lora_keys_diffusers = False
    #: no kohya copy: kohya's SD3 / FLUX LoRA files name the original checkpoints' layers (fused qkv
    #: projections), which diffusers' converter does not produce; tools read the diffusers file instead
    kohya_lora = False
    #: the pipeline's default max_sequence_length
    default_max_sequence_length = 256
    #: T5's component name in the pipeline folder
    t5_slot = "text_encoder_3"

    def __init__(self, transformer, noise_scheduler, text_encoder, tokenizer, vae, t5: LazyModule | None,
                 max_sequence_length: int | None, source: str, density: str):  # fmt: skip
        super().__init__(transformer, noise_scheduler, text_encoder, tokenizer, vae, None, source)
        self.process = self.process.with_options(density=density)
        self.t5 = t5
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length

    @property
    def lora_target_modules(self) -> list[str]:
        return list(MMDIT_LORA_TARGETS)

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ["text_encoder", "text_encoder_2"]
        mods = dict(zip(names, self._text_encoders())) | {"vae": self.vae}
        if self.t5 is not None and self.t5.loaded:
            mods[self.t5_slot] = self.t5.module
        return mods

    def place(self, device, dtype: torch.dtype, vae_fp32: bool = True) -> None:
        super().place(device, dtype, vae_fp32)
        if self.t5 is not None:
            self.t5.place(device, dtype)

    def _pipeline_parts(self, denoiser: nn.Module | None) -> dict:
        """The components every MMDiT pipeline takes, with its own copy of the scheduler (its timesteps)."""
        return dict(transformer=denoiser if denoiser is not None else self.denoiser, vae=self.vae,
                    scheduler=type(self.noise_scheduler).from_config(self.noise_scheduler.config),
                    text_encoder=self.text_encoder, tokenizer=self.tokenizer)  # fmt: skip

    def fingerprint(self) -> dict:
        """The CLIP encoders and VAE by their weights, T5 by its files (without loading it) or "none"."""
        return {
            "family": self.family,
            "vae": module_digest(self.vae),
            "text_encoders": [module_digest(m) for m in self._text_encoders()],
            "t5": self.t5.digest() if self.t5 is not None else "none",
            "max_length": [t.model_max_length for t in self._tokenizers()] + [self.max_sequence_length],
        }


class StableDiffusion3Backbone(MMDiTBackbone):
    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"

    def __init__(self, transformer, noise_scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 t5: LazyModule | None, tokenizer_3, vae, max_sequence_length: int | None = None, source: str = "",
                 density: str = "logit_normal"):  # fmt: skip
        super().__init__(transformer, noise_scheduler, text_encoder, tokenizer, vae, t5, max_sequence_length, source,
                         density)  # fmt: skip
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.tokenizer_3 = tokenizer_3

    @property
    def text_encoder_3(self) -> nn.Module | None:
        """T5, built on first access (None when left out)."""
        return self.t5.get() if self.t5 is not None else None

    # -- text -----------------------------------------------------------------------------------------
    def _text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]

    def _tokenizers(self):
        return [self.tokenizer, self.tokenizer_2]

    @torch.no_grad()
    def _clip(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-L and CLIP-G: penultimate hidden states concatenated on features, projected pooled outputs
        concatenated (the pipeline's `_get_clip_prompt_embeds` with clip_skip=None)."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self._tokenizers(), self._text_encoders()):
            out = encoder(tokenize(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        clip, pooled = self._clip(prompts)
        width = self.denoiser.config.joint_attention_dim
        if self.t5 is None:  # the pipeline with text_encoder_3=None: zeros in T5's place
            t5 = torch.zeros(len(prompts), self.max_sequence_length, width, device=clip.device, dtype=clip.dtype)
        else:
            t5 = t5_states(self.tokenizer_3, self.text_encoder_3, prompts, self.max_sequence_length).to(clip.device)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": pooled}

    # -- denoiser -------------------------------------------------------------------------------------
    def predict(self, model, x, t, cond: Conditioning):
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled"], return_dict=False)[0]  # fmt: skip

    def schedule_kwargs(self, height: int, width: int, steps: int) -> dict:
        """StableDiffusion3Pipeline's `mu` for a scheduler with dynamic shifting (none for SD3 / SD3.5's
        own schedulers, which shift by a constant)."""
        config = dict(self.noise_scheduler.config)
        if not config.get("use_dynamic_shifting"):
            return {}
        s, p = self.vae_scale(), self.denoiser.config.patch_size
        return {"mu": dynamic_shift_mu((height // s // p) * (width // s // p), config, 1.16)}

    # -- export -------------------------------------------------------------------------------------
    def pipeline(self, denoiser: nn.Module | None = None):
        """A StableDiffusion3Pipeline over this backbone's components (T5 built now if it is used)."""
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**self._pipeline_parts(denoiser), text_encoder_2=self.text_encoder_2,
                                        tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3,
                                        tokenizer_3=self.tokenizer_3 if self.t5 is not None else None)  # fmt: skip


# ---- loading ------------------------------------------------------------------------------------------


def load_clip_pair(path, revision=None, variant=None, second="text_encoder_2") -> dict:
    """CLIP-L and CLIP-G with projection and their tokenizers, frozen."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    kw = dict(revision=revision)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        "tokenizer_2": AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
        "text_encoder": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", variant=variant,
                                                                    **kw).requires_grad_(False),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder=second, variant=variant,
                                                                      **kw).requires_grad_(False),
    }  # fmt: skip


def load_flow_parts(path, revision=None, variant=None, vae=None) -> dict:
    """The transformer, VAE and flow scheduler of an SD3 / FLUX folder, frozen; `vae` replaces the VAE."""
    import diffusers
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )

    index = diffusers.DiffusionPipeline.load_config(path, revision=revision)
    cls = {"SD3Transformer2DModel": SD3Transformer2DModel, "FluxTransformer2DModel": FluxTransformer2DModel}
    name = index.get("transformer", [None, None])[1]
    if name not in cls:
        raise ValueError(f"{path!r}: its transformer is a {name}; expected one of {sorted(cls)}")
    kw = dict(revision=revision)
    return {
        "transformer": cls[name].from_pretrained(path, subfolder="transformer", variant=variant, **kw).requires_grad_(False),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        "vae": (AutoencoderKL.from_pretrained(vae) if vae else
                AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)).requires_grad_(False),
        "index": index,
    }  # fmt: skip


def t5_part(path, subfolder: str, index: dict, revision=None, variant=None, use: bool = True):
    """(lazy T5, its tokenizer) of a folder, or (None, None) when the folder has none or it is left out."""
    if not use or index.get(subfolder, [None, None])[1] is None:
        return None, None
    from transformers import AutoTokenizer

    tok_folder = "tokenizer_3" if subfolder == "text_encoder_3" else "tokenizer_2"
    return (lazy_t5_from(path, subfolder, revision, variant),
            AutoTokenizer.from_pretrained(path, subfolder=tok_folder, revision=revision))  # fmt: skip


def load_sd3(path, revision=None, variant=None, vae=None, prediction_type=None, t5: bool = True,
             max_sequence_length: int | None = None) -> StableDiffusion3Backbone:  # fmt: skip
    parts = load_flow_parts(path, revision, variant, vae)
    clip = load_clip_pair(path, revision, variant)
    lazy, tok3 = t5_part(path, "text_encoder_3", parts["index"], revision, variant, use=t5)
    return StableDiffusion3Backbone(parts["transformer"], parts["scheduler"], clip["text_encoder"], clip["tokenizer"],
                                    clip["text_encoder_2"], clip["tokenizer_2"], lazy, tok3, parts["vae"],
                                    max_sequence_length, source=path)  # fmt: skip


def _built(components: dict, source: str, t5: bool = True, max_sequence_length: int | None = None):
    c = components
    lazy = LazyModule.of(c["text_encoder_3"]) if t5 and c.get("text_encoder_3") is not None else None
    return StableDiffusion3Backbone(c["transformer"], c["scheduler"], c["text_encoder"], c["tokenizer"],
                                    c["text_encoder_2"], c["tokenizer_2"], lazy, c["tokenizer_3"] if lazy else None,
                                    c["vae"], max_sequence_length, source=source)  # fmt: skip


def tiny_sd3(prediction_type=None, t5: bool = True, max_sequence_length: int | None = None) -> StableDiffusion3Backbone:
    from diffalign.backbones.tiny import tiny_sd3_components

    return _built(tiny_sd3_components(), "tiny:sd3", t5, max_sequence_length)


def random_sd3(prediction_type=None, t5: bool = True, max_sequence_length: int | None = None) -> StableDiffusion3Backbone:
    """The SD3-Medium architecture with random weights (T5-XXL built lazily, on first use)."""
    from diffalign.backbones.tiny import random_sd3_components

    c = random_sd3_components()
    return _random_backbone(c, "random:sd3", t5, max_sequence_length)


def small_sd3(prediction_type=None, t5: bool = True, max_sequence_length: int | None = None) -> StableDiffusion3Backbone:
    """The SD3-Medium layout scaled down (CPU benchmarks), random weights."""
    from diffalign.backbones.tiny import random_sd3_components

    return _random_backbone(random_sd3_components(scale="small"), "small:sd3", t5, max_sequence_length)


def _random_backbone(c: dict, source: str, t5: bool, max_sequence_length):
    lazy = LazyModule(lambda dtype: c["build_t5"](), lambda: f"{source}/t5") if t5 else None
    return StableDiffusion3Backbone(c["transformer"], c["scheduler"], c["text_encoder"], c["tokenizer"],
                                    c["text_encoder_2"], c["tokenizer_2"], lazy, c["tokenizer_3"] if lazy else None,
                                    c["vae"], max_sequence_length, source=source)  # fmt: skip
