"""Backbones: the only code that knows a model family, with the noise processes under them.

`load_backbone(pretrained)` picks the family from the folder's model_index.json `_class_name` (or
`family=`); `tiny:<family>` / `random:<family>` build models in code."""

from __future__ import annotations

from diffalign.backbones.base import Backbone, Conditioning, Family
from diffalign.backbones.processes import DDPMProcess, FlowMatchingProcess, NoiseProcess, StepResult
from diffalign.backbones.registry import detect_family, families, load_backbone, register_family
from diffalign.backbones.sd import PIXEL_CLASS_NAME, PixelBackbone, StableDiffusionBackbone
from diffalign.backbones.sdxl import StableDiffusionXLBackbone

__all__ = [
    "Backbone", "Conditioning", "DDPMProcess", "FlowMatchingProcess", "NoiseProcess", "StepResult", "Family",
    "PIXEL_CLASS_NAME", "detect_family", "families", "load_backbone", "register_family", "PixelBackbone",
    "StableDiffusionBackbone", "StableDiffusionXLBackbone",
]  # fmt: skip
