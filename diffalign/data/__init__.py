"""Preference data: sources (Pick-a-Pic, Pick-Double-Caption, Syn-Pic ranked, jsonl, HPDv2), the joint
crop/flip transform and the collate function. docs/data.md is the user guide."""

from diffalign.data.config import DataConfig
from diffalign.data.dataset import PreferenceDataset, build_preference_dataset, collate_preference, item_draws
from diffalign.data.sources import DataFormatError
from diffalign.data.transforms import transform_item

__all__ = [
    "DataConfig",
    "DataFormatError",
    "PreferenceDataset",
    "build_preference_dataset",
    "collate_preference",
    "item_draws",
    "transform_item",
]
