"""Families by the pipeline class a model folder names: `model_index.json`'s `_class_name` decides, never a
guess from folder contents. Each family registers a loader (a local folder or hub id) and, for tests and
benchmarks, builders of tiny / full-size random models (`tiny:<family>`, `random:<family>`)."""

from __future__ import annotations

from pathlib import Path

from diffalign.backbones import sd, sdxl
from diffalign.backbones.base import Backbone, Family
from diffalign.errors import UserError

_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", ("StableDiffusionPipeline",), sd.load_sd, {"tiny": sd.tiny_sd}),
        Family("sdxl", ("StableDiffusionXLPipeline",), sdxl.load_sdxl, {"tiny": sdxl.tiny_sdxl, "random": sdxl.random_sdxl}),
        Family("pixel", (sd.PIXEL_CLASS_NAME,), sd.load_pixel),
    )
}


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


def load_backbone(pretrained: str, family: str = "auto", revision: str | None = None, variant: str | None = None,
                  vae: str | None = None, prediction_type: str | None = None) -> Backbone:  # fmt: skip
    """Build the backbone for `pretrained`: a hub id, a local diffusers folder, `tiny:<family>` (tiny random
    models built in code) or `random:<family>` (full-size architecture, random weights, for benchmarks)."""
    fams = families()
    for kind in ("tiny", "random"):
        if pretrained.startswith(f"{kind}:"):
            name = pretrained.split(":", 1)[1]
            builder = fams[name].builders.get(kind) if name in fams else None
            if builder is None:
                have = [f"{kind}:{n}" for n, f in fams.items() if kind in f.builders]
                raise ValueError(f"unknown model {pretrained!r}; built-in {kind} models: {', '.join(have)}")
            return builder(prediction_type=prediction_type)
    if family == "auto":
        fam = detect_family(pretrained, revision)
    elif family in fams:
        fam = fams[family]
    else:
        raise ValueError(f"model.family must be 'auto' or one of {sorted(fams)}, got {family!r}")
    return fam.load(pretrained, revision=revision, variant=variant, vae=vae, prediction_type=prediction_type)
