"""The transformers Mask2Former backend on a tiny random config (no download): plumbing only."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.evaluation.geneval import Mask2FormerDetector, evaluate_image, mask_to_box, select_objects
from diffalign.evaluation.geneval_prompts import OBJECT_NAMES
from diffalign.evaluation.layout import sample_path, write_metadata


def tiny_mask2former(num_labels=80):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=num_labels, num_queries=8, hidden_dim=32, feature_size=32,
        mask_feature_size=32, encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=64, dim_feedforward=64,
        num_attention_heads=4,
    )  # fmt: skip
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(config).eval()


def test_tiny_mask2former_detections_have_the_official_shape(tmp_path):
    det = Mask2FormerDetector(tiny_mask2former(), scale=(96, 64))
    assert "NOT the official detector" in det.describe()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    pixels, pixel_mask, (nh, nw) = det.preprocess(img)
    assert (nh, nw) == (64, 90) and pixels.shape[-2] % 32 == 0 and pixels.shape[-1] % 32 == 0
    assert int(pixel_mask.sum()) == nh * nw

    raw = det.detect(img)
    assert set(raw) <= set(OBJECT_NAMES)
    flat = [o for objs in raw.values() for o in objs]
    assert len(flat) == 100  # top-100 (query, class) pairs out of 8 x 80
    for box, mask in flat:
        assert box.shape == (5,) and 0.0 <= box[4] <= 1.0
        assert mask.shape == (40, 56) and mask.dtype == bool
        assert box[:4].tolist() == mask_to_box(mask).tolist()
    # the top score is class probability x mask score, so at most the best class probability
    with torch.no_grad():
        out = det.model(pixel_values=pixels, pixel_mask=pixel_mask)
    best_prob = out.class_queries_logits[0].softmax(-1)[:, :-1].max().item()
    assert max(b[4] for b, _ in flat) <= best_prob + 1e-6

    # and the whole per-image path runs on it
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    write_metadata(tmp_path, 0, meta)
    img.save(sample_path(tmp_path, 0, 0))
    row = evaluate_image(sample_path(tmp_path, 0, 0), meta, det, None)
    assert row["correct"] == ("cat" in select_objects(raw, "single_object"))


def test_wrong_label_count_is_refused():
    with pytest.raises(ValueError, match="80 classes"):
        Mask2FormerDetector(tiny_mask2former(num_labels=10))
