"""Families by the pipeline class a model folder names: `model_index.json`'s `_class_name` decides, never a
guess from folder contents. Each family registers a loader (a local folder or hub id) and, for tests and
benchmarks, builders of tiny / full-size random / scaled-down random models (`tiny:<family>`,
`random:<family>`, `small:<family>`)."""

from __future__ import annotations

from pathlib import Path

from diffalign.backbones import flux, sd, sd3, sdxl
from diffalign.backbones.base import Backbone, Family
from diffalign.errors import UserError

_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", ("StableDiffusionPipeline",), sd.load_sd, {"tiny": sd.tiny_sd}),
        Family("sdxl", ("StableDiffusionXLPipeline",), sdxl.load_sdxl, {"tiny": sdxl.tiny_sdxl, "random": sdxl.random_sdxl}),
        Family("pixel", (sd.PIXEL_CLASS_NAME,), sd.load_pixel),
        Family("sd3", ("StableDiffusion3Pipeline",), sd3.load_sd3,
               {"tiny": sd3.tiny_sd3, "random": sd3.random_sd3, "small": sd3.small_sd3},
               options=("t5", "max_sequence_length")),
        Family("flux", ("FluxPipeline",), flux.load_flux,
               {"tiny": flux.tiny_flux, "random": flux.random_flux, "small": flux.small_flux},
               options=("max_sequence_length", "guidance_embedding")),
    )
}  # fmt: skip

#: family-specific ModelConfig fields and the value that means "not set"
FAMILY_OPTIONS = {"t5": True, "max_sequence_length": None, "guidance_embedding": None}
BUILDER_KINDS = ("tiny", "random", "small")


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"backbone family {family.name!r} registered twice")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


def family_for_class(class_name: str) -> Family | None:
    return next((f for f in families().values() if class_name in f.class_names), None)


def read_model_index(pretrained: str, revision: str | None = None) -> dict:
    """model_index.json of a local folder or hub id; a ModelNotFound line saying what to do otherwise."""
    import warnings

    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # diffusers passes hf_hub_download an argument it deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            return DiffusionPipeline.load_config(pretrained, revision=revision)
    except Exception as err:  # one clear line instead of a hub traceback
        raise ModelNotFound(_not_found(pretrained, err)) from err


class ModelNotFound(UserError, FileNotFoundError):
    """model.pretrained names no readable diffusers pipeline."""


def _looks_local(name: str) -> bool:
    return Path(name).exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _not_found(pretrained: str, err: Exception) -> str:
    from huggingface_hub import constants

    builtin = f"tiny:<family> for tiny random models ({', '.join(families())})"
    if _looks_local(pretrained):
        if not Path(pretrained).expanduser().is_dir():
            return f"model folder {pretrained!r} does not exist; give a diffusers pipeline folder (with model_index.json), a hub id, or {builtin}"
        return f"{pretrained!r} holds no model_index.json, so it is not a diffusers pipeline folder; give one, a hub id, or {builtin}"
    if constants.HF_HUB_OFFLINE:
        return (f"hub model {pretrained!r} is not in the local Hugging Face cache and the hub is offline "
                f"(HF_HUB_OFFLINE=1): download it once while online (`hf download {pretrained}`), or unset "
                "HF_HUB_OFFLINE, or give a local folder")  # fmt: skip
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"could not read model_index.json of hub model {pretrained!r} ({first}); check the id and your "
            "connection, and log in (`hf auth login`) for gated or private models")  # fmt: skip


def detect_family(pretrained: str, revision: str | None = None) -> Family:
    """The family a model folder or hub id declares in model_index.json."""
    index = read_model_index(pretrained, revision)
    name = index.get("_class_name", "")
    fam = family_for_class(name)
    if fam is None:
        known = sorted(c for f in families().values() for c in f.class_names)
        raise ValueError(f"{pretrained!r} is a {name or 'pipeline without _class_name'}, which diffalign does not "
                         f"train; known pipeline classes: {', '.join(known)}. Set model.family to force one.")  # fmt: skip
    return fam


def _family_options(fam: Family, options: dict) -> dict:
    """The family-specific options that were set, refused (naming the key) where the family has no such option."""
    given = {k: v for k, v in options.items() if v != FAMILY_OPTIONS.get(k)}
    wrong = [k for k in given if k not in fam.options]
    if wrong:
        takers = {k: [f.name for f in families().values() if k in f.options] for k in wrong}
        raise ValueError("; ".join(f"model.{k} applies to {' / '.join(takers[k]) or 'no'} models, not {fam.name}"
                                   for k in wrong))  # fmt: skip
    return given


def load_backbone(pretrained: str, family: str = "auto", revision: str | None = None, variant: str | None = None,
                  vae: str | None = None, prediction_type: str | None = None, flow: dict | None = None,
                  **options) -> Backbone:  # fmt: skip
    """Build the backbone for `pretrained`: a hub id, a local diffusers folder, `tiny:<family>` (tiny random
    models built in code), `random:<family>` (full-size architecture, random weights, for benchmarks) or
    `small:<family>` (that architecture scaled down, for CPU benchmarks). `flow`: flow-matching training
    options (ModelConfig.flow); `options`: family-specific ones (t5, max_sequence_length, guidance_embedding)."""
    unknown = sorted(set(options) - set(FAMILY_OPTIONS))
    if unknown:
        raise TypeError(f"unknown backbone option(s) {unknown}")
    fams = families()
    for kind in BUILDER_KINDS:
        if pretrained.startswith(f"{kind}:"):
            name = pretrained.split(":", 1)[1]
            builder = fams[name].builders.get(kind) if name in fams else None
            if builder is None:
                have = [f"{kind}:{n}" for n, f in fams.items() if kind in f.builders]
                raise ValueError(f"unknown model {pretrained!r}; built-in {kind} models: {', '.join(have)}")
            bb = builder(prediction_type=prediction_type, **_family_options(fams[name], options))
            return _with_flow_options(bb, flow, pretrained, prediction_type)
    if family == "auto":
        fam = detect_family(pretrained, revision)
    elif family in fams:
        fam = fams[family]
    else:
        raise ValueError(f"model.family must be 'auto' or one of {sorted(fams)}, got {family!r}")
    bb = fam.load(pretrained, revision=revision, variant=variant, vae=vae, prediction_type=prediction_type,
                  **_family_options(fam, options))  # fmt: skip
    return _with_flow_options(bb, flow, pretrained, prediction_type)


def _with_flow_options(bb: Backbone, flow: dict | None, pretrained: str, prediction_type: str | None) -> Backbone:
    """Apply model.flow (timestep density, logit-normal / mode parameters, precondition_outputs); None
    values keep the family's defaults. Refused for a model that is not flow-matching, as is a
    prediction_type for one that is."""
    if prediction_type is not None and bb.process.kind == "flow":
        raise ValueError(f"model.prediction_type={prediction_type!r}: {pretrained!r} is a flow-matching model, which "
                         "predicts the velocity; leave prediction_type unset")  # fmt: skip
    if not flow:
        return bb
    if bb.process.kind != "flow":
        raise ValueError(f"model.flow applies to flow-matching models (SD3, FLUX, a flow toy); {pretrained!r} is a "
                         f"{bb.process.kind} model")  # fmt: skip
    bb.process = bb.process.with_options(**flow)
    return bb


def backbone_from_config(model) -> Backbone:
    """The backbone a config's `model` section (diffalign.config.ModelConfig) describes."""
    flow = model.flow.model_dump() if model.flow is not None else None
    if flow is not None:
        flow["density"] = flow.pop("timestep_density")
    return load_backbone(model.pretrained, model.family, model.revision, model.variant, model.vae,
                         model.prediction_type, flow=flow, **{k: getattr(model, k) for k in FAMILY_OPTIONS})  # fmt: skip
