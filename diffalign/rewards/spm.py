"""The step-aware preference model (SPM) of SPO (Liang et al., arXiv 2406.04314): PickScore with a timestep.

It scores a *predicted* clean image x0-hat decoded at denoising timestep t, so that SPO can compare the
candidates of one step (diffalign/sampling/resample.py). Architecture (RockeyCoss/SPO
`spo_training_and_inference/spo/preference_models/models/time_conditioned_clip.py`, the same file in
`step_aware_preference_model/trainer/models/`):

- PickScore's CLIP-H/14 (a transformers CLIPModel), whole;
- a DiT-style timestep embedder: a 256-d sinusoid of t (cos half then sin half, max period 10000) ->
  Linear(256, E) -> SiLU -> Linear(E, E), E the vision width;
- in every vision encoder layer an adaLN modulation SiLU -> Linear(E, 6E) of that embedding, giving
  (shift, scale, gate) for the attention branch and for the MLP branch:
  h = h + gate_a * attn(LN1(h) * (1 + scale_a) + shift_a);  h = h + gate_m * mlp(LN2(h) * (1 + scale_m) + shift_m);
- a final adaLN SiLU -> Linear(E, 2E) giving (shift, scale) of the pooled output after post_layernorm;
- the text tower untouched. Score = exp(logit_scale) * cos(image features(x0-hat, t), text features).

Initialisation (`StepAwareCLIP.reset_step_parameters`) follows the SPM trainer's `init_adaln_paras`
(`step_aware_preference_model/trainer/models/step_aware_preference_model.py`): adaLN weights 0, shifts and
scales 0, gates 1, timestep-MLP weights N(0, 0.02) with zero biases, final adaLN 0. The model is then
exactly PickScore at every t. (The model file's own constructor writes a bias of all ones, which would
not be PickScore; the trainer overwrites it with the values above before training.)

Images: the reference feeds the decoded x0-hat in [-1, 1] as a tensor, resized with bicubic interpolation
so that the short side is 224 (sizes rounded with int(x + 0.5)), centre-cropped when not square, mapped
to [0, 1] and clamped, then CLIP-normalised (`StepAwarePreferenceModel.get_preference_score`). Here a
tensor is taken in [0, 1] like every diffalign scorer, but not clamped before the resize (so the result is
the reference's up to float rounding: resizing commutes with the affine map); PIL images go through
PickScore's own processor, so `diffalign score --scorer spm` at t = 0 reads files as PickScore does.

Checkpoints: the released SPMs (`SPO-Diffusion-Models/Step-Aware_Preference_Models`,
`sd-v1-5_step-aware_preference_model.bin` / `sdxl_step-aware_preference_model.bin`) are torch files of
the reference's module names; they are read with `weights_only=True` through a strict key map
(`reference_key`): a missing or unexpected key is an error naming it. `diffalign train-spm` exports
`spm.safetensors` in the same key space.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.rewards._common import load_torch_state_dict, resolve_checkpoint_file, resolve_dtype
from diffalign.rewards._hf_clip import _features, hf_pil_image_transform, load_hf_clip, tiny_clip_components
from diffalign.rewards.base import register_scorer
from diffalign.rewards.pickscore import PICKSCORE_MODEL, PICKSCORE_PROCESSOR, PickScoreScorer

SPM_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"
#: released checkpoints by the family whose x0-hat they were trained on (RockeyCoss/SPO README, configs)
SPM_FILES = {"sd15": "sd-v1-5_step-aware_preference_model.bin", "sdxl": "sdxl_step-aware_preference_model.bin"}
#: what `diffalign train-spm` exports (the reference's key names, safetensors)
SPM_EXPORT = "spm.safetensors"
FREQUENCY_DIM = 256  # TimestepEmbedder(frequency_embedding_size=256)
#: buffers that transformers 4.27 saved and newer versions do not: accepted when they hold arange
_POSITION_IDS = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[N] (possibly fractional) timesteps -> [N, dim]: cos(t f_i) then sin(t f_i), f_i = max_period^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequency_dim: int = FREQUENCY_DIM):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def _modulation(width: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(width, chunks * width))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class StepAwareCLIP(nn.Module):
    """A transformers CLIPModel (PickScore) whose vision tower is conditioned on a denoising timestep."""

    def __init__(self, clip: nn.Module, seed: int = 0):
        super().__init__()
        self.clip = clip
        width = clip.config.vision_config.hidden_size
        self.t_embedder = TimestepEmbedder(width)
        self.layer_adaln = nn.ModuleList(_modulation(width, 6) for _ in clip.vision_model.encoder.layers)
        self.pooled_adaln = _modulation(width, 2)
        self.reset_step_parameters(seed)
        self.to(next(clip.parameters()).dtype)

    @torch.no_grad()
    def reset_step_parameters(self, seed: int = 0) -> None:
        """The SPM trainer's initialisation: the model equals the underlying CLIP at every t."""
        g = torch.Generator().manual_seed(seed)
        width = self.clip.config.vision_config.hidden_size
        for mod in self.layer_adaln:
            lin = mod[-1]
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[2 * width : 3 * width] = 1  # the attention gate
            lin.bias[5 * width :] = 1  # the MLP gate
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
            lin.bias.zero_()
        self.pooled_adaln[-1].weight.zero_()
        self.pooled_adaln[-1].bias.zero_()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def get_text_features(self, **kwargs) -> torch.Tensor:
        return _features(self.clip.get_text_features(**kwargs))

    def get_image_features(self, pixel_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Projected image features of CLIP-normalised pixels [N, 3, S, S] at timesteps t [N]."""
        vision = self.clip.vision_model
        cond = self.t_embedder(torch.as_tensor(t, device=pixel_values.device).reshape(-1).expand(len(pixel_values)))
        h = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer, modulation in zip(vision.encoder.layers, self.layer_adaln):
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation(cond).chunk(6, dim=1)
            attn = layer.self_attn(hidden_states=_modulate(layer.layer_norm1(h), shift_a, scale_a), attention_mask=None)[0]
            h = h + attn * gate_a.unsqueeze(1)
            h = h + layer.mlp(_modulate(layer.layer_norm2(h), shift_m, scale_m)) * gate_m.unsqueeze(1)
        pooled = vision.post_layernorm(h[:, 0, :])
        shift, scale = self.pooled_adaln(cond).chunk(2, dim=1)
        return self.clip.visual_projection(pooled * (1 + scale) + shift)

    def forward(self, pixel_values: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(image features at t, text features): both towers in one call (training under DDP)."""
        return self.get_image_features(pixel_values, t), self.get_text_features(input_ids=input_ids,
                                                                                 attention_mask=attention_mask)

    # ---- the released checkpoints' key space ---------------------------------------------------------
    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the reference's module names."""
        return {reference_key(k): v for k, v in self.state_dict().items()}

    def load_reference_state_dict(self, state: Mapping[str, torch.Tensor], where: str = "SPM checkpoint") -> None:
        """Load weights named as the reference names them; strict (see `map_reference_state_dict`)."""
        self.load_state_dict(map_reference_state_dict(self, state, where), strict=True)


def reference_key(key: str) -> str:
    """Our parameter name -> the reference's (`StepAwarePreferenceModel.model` = HFTimeConditionedCLIPModel)."""
    if key.startswith("clip."):
        return "model." + key[len("clip.") :]
    if key.startswith("t_embedder."):
        return "model." + key
    m = re.fullmatch(r"layer_adaln\.(\d+)\.(.+)", key)
    if m:
        return f"model.vision_model.encoder.layers.{m[1]}.adaLN_modulation.{m[2]}"
    if key.startswith("pooled_adaln."):
        return "model.vision_model.adaLN_modulation." + key[len("pooled_adaln.") :]
    raise KeyError(f"no reference name for parameter {key!r}")


def map_reference_state_dict(model: StepAwareCLIP, state: Mapping[str, torch.Tensor],
                             where: str = "SPM checkpoint") -> dict[str, torch.Tensor]:  # fmt: skip
    """A reference-named state dict -> ours. Every parameter must be present with its shape, and nothing
    else may be (transformers 4.27's persistent position_ids buffers excepted, which must hold arange):
    otherwise a ValueError naming the keys (an SD1.5/SDXL SPM on a CLIP of another size, or a file that is
    not an SPM, fails here instead of loading half)."""
    ours = model.state_dict()
    by_reference = {reference_key(k): k for k in ours}
    missing = sorted(set(by_reference) - set(state))
    extra = []
    for key in _POSITION_IDS:
        if key in state and key not in by_reference:
            v = state[key]
            if not torch.equal(v.reshape(-1).to(torch.int64), torch.arange(v.numel())):
                extra.append(key)
    extra += sorted(k for k in state if k not in by_reference and k not in _POSITION_IDS)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {len(extra)} key(s): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    shapes = [f"{k}: {tuple(state[k].shape)} (model {tuple(ours[v].shape)})" for k, v in by_reference.items()
              if k in state and tuple(state[k].shape) != tuple(ours[v].shape)]  # fmt: skip
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:3])}")
    if problems:
        raise ValueError(f"{where} does not fit this step-aware preference model: " + "; ".join(problems)
                         + ". Use a checkpoint made for this CLIP (the released SPMs are CLIP-H/14, PickScore)")  # fmt: skip
    return {by_reference[k]: state[k].to(ours[by_reference[k]].dtype) for k in by_reference}


def load_spm_weights(model: StepAwareCLIP, checkpoint: str | Path) -> Path:
    """`checkpoint`: "sd15" / "sdxl" (the released SPMs, from the hub), a released-format .bin / .pt (torch,
    weights_only), a .safetensors file, or a folder holding `spm.safetensors` (a `diffalign train-spm` export)
    or a released .bin. Returns the file read."""
    if str(checkpoint) in SPM_FILES:
        path = resolve_checkpoint_file(None, SPM_REPO, SPM_FILES[str(checkpoint)], "SPM")
    else:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            found = [path / SPM_EXPORT] + [path / f for f in SPM_FILES.values()]
            path = next((p for p in found if p.is_file()), path / SPM_EXPORT)
        if not path.is_file():
            raise FileNotFoundError(f"SPM checkpoint not found: {path} (give sd15, sdxl, a .bin / .safetensors file "
                                    f"or a folder with {SPM_EXPORT})")  # fmt: skip
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_torch_state_dict(path)
    model.load_reference_state_dict(state, where=f"SPM checkpoint {path}")
    return path


# ---- the scorer ----------------------------------------------------------------------------------------


class SPMScorer(PickScoreScorer):
    """`score(images, prompts, t=0)`: PickScore's scale and text side, the step-aware image side."""

    name = "spm"
    #: the resampler passes x0-hat's timestep to scorers that have this (others ignore t)
    step_aware = True

    def __init__(self, model: StepAwareCLIP, tokenizer, image_processor, device=None, dtype=None, batch_size: int = 32):
        super().__init__(model, tokenizer, hf_pil_image_transform(image_processor), device=device, dtype=dtype,
                         batch_size=batch_size)  # fmt: skip
        self.size = int(image_processor.size["shortest_edge"])
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)

    def pixels(self, images) -> torch.Tensor:
        """CLIP-normalised pixels: PIL through PickScore's processor; a [N, 3, H, W] tensor in [0, 1] (values
        outside are clamped after the resize) through the reference SPM's bicubic resize and centre crop."""
        if not isinstance(images, torch.Tensor):
            return self.image_transform(images)
        return spm_tensor_pixels(images, self.size, self.mean, self.std)

    def encode_images(self, images, t=0) -> torch.Tensor:
        pixels = self.pixels(images).to(device=self.device, dtype=self.dtype)
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(pixels))
        return F.normalize(self.model.get_image_features(pixels, t).float(), dim=-1)

    @torch.no_grad()
    def score(self, images, prompts, t=0) -> torch.Tensor:
        """One score per image at denoising timestep(s) t (a number, or one per image; 0 = a clean image)."""
        n = len(images)
        prompt_list = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != n:
            raise ValueError(f"{self.name}: got {n} images but {len(prompt_list)} prompts")
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(n) if n else torch.zeros(0)
        self._text_cache = {}
        try:
            out = []
            for i in range(0, n, self.batch_size):
                img = self.encode_images(images[i : i + self.batch_size], t[i : i + self.batch_size])
                txt = self._cached_text(prompt_list[i : i + self.batch_size]).to(img.device)
                out.append(self._from_cosine((img * txt).sum(-1)).float().cpu())
        finally:
            self._text_cache = None
        return torch.cat(out) if out else torch.empty(0)

    __call__ = score


def spm_tensor_pixels(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The reference SPM's tensor preprocessing (see the module docstring), on images in [0, 1]."""
    from torchvision.transforms.functional import center_crop

    x = images.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = F.interpolate(x, size=new, mode="bicubic", align_corners=False)
    if new[0] != new[1]:
        x = center_crop(x, [size, size])
    x = x.clamp(0, 1)
    return (x - mean.to(x.device)) / std.to(x.device)


def build_spm_model(model: str = PICKSCORE_MODEL, processor: str | None = PICKSCORE_PROCESSOR, dtype=None,
                    tiny: bool = False, seed: int = 0):  # fmt: skip
    """(StepAwareCLIP initialised from PickScore, its tokenizer, its PIL image processor)."""
    if tiny:
        clip, tokenizer, image_processor = tiny_clip_components(seed=seed)
    else:
        clip, tokenizer, image_processor = load_hf_clip(model, processor, resolve_dtype(dtype))
    return StepAwareCLIP(clip, seed=seed), tokenizer, image_processor


@register_scorer("spm")
def build_spm(checkpoint: str | None = None, model: str = PICKSCORE_MODEL, processor: str | None = PICKSCORE_PROCESSOR,
              device=None, dtype=None, batch_size: int = 32, tiny: bool = False, seed: int = 0) -> SPMScorer:  # fmt: skip
    """The step-aware preference model. `checkpoint`: "sd15" or "sdxl" (the released SPMs, downloaded from
    the hub), a file or a `diffalign train-spm` export folder; None keeps the initial step parameters, which
    make it PickScore at every t. `tiny=True` gives a random toy CLIP for tests."""
    spm, tokenizer, image_processor = build_spm_model(model, processor, dtype, tiny, seed)
    if checkpoint is not None:
        load_spm_weights(spm, checkpoint)
    return SPMScorer(spm, tokenizer, image_processor, device=device, dtype=dtype, batch_size=batch_size)


# ---- any scorer as a step scorer -------------------------------------------------------------------------

StepScorer = Callable[[torch.Tensor, list, torch.Tensor], torch.Tensor]


def as_step_scorer(scorer) -> StepScorer:
    """`fn(images, prompts, t) -> scores [N]` for the step-wise resampler. `images` are decoded x0-hat in
    [-1, 1] (not clamped), t the denoising timestep of each (0 for final samples). A step-aware scorer (the
    SPM) gets t and the unclamped [0, 1] image; any other scorer scores the clamped image and ignores t."""

    def fn(images: torch.Tensor, prompts: list, t: torch.Tensor) -> torch.Tensor:
        x = images.float() / 2 + 0.5
        if getattr(scorer, "step_aware", False):
            return scorer.score(x, prompts, t)
        return scorer.score(x.clamp(0, 1), prompts)

    return fn
