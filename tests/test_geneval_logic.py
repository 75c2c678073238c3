"""GenEval decision rules on synthetic detections, at each boundary of the official rules."""

import json

import numpy as np
import pytest
from PIL import Image

from diffalign.evaluation.geneval import (
    ColorClassifier,
    GenEvalOptions,
    box_iou,
    color_crop,
    evaluate_folder,
    evaluate_metadata,
    mask_to_box,
    register_tiny_open_clip,
    relative_position,
    select_objects,
    summarize,
)
from diffalign.evaluation.layout import LayoutError, sample_path, write_metadata


def obj(x1, y1, x2, y2, score=0.99, mask=None):
    return (np.array([x1, y1, x2, y2, score], dtype=np.float32), mask)


def boxes(n, score=0.95):
    return [obj(10 * i, 0, 10 * i + 5, 5, score) for i in range(n)]


# ---------------------------------------------------------------- thresholds and selection


def test_threshold_is_strict_and_counting_uses_0_9():
    raw = {"cat": [obj(0, 0, 1, 1, 0.3), obj(0, 0, 1, 1, 0.3001)], "dog": [obj(0, 0, 1, 1, 0.9), obj(0, 0, 1, 1, 0.9001)]}
    sel = select_objects(raw, "two_object")
    assert len(sel["cat"]) == 1 and len(sel["dog"]) == 2  # score must be > 0.3, not >=
    sel = select_objects(raw, "counting")
    assert "cat" not in sel and len(sel["dog"]) == 1  # counting: > 0.9 for every class


def test_sorted_by_score_and_capped_at_16():
    raw = {"cup": [obj(i, 0, i + 1, 1, 0.31 + i * 0.01) for i in range(20)]}
    sel = select_objects(raw, "single_object")["cup"]
    assert len(sel) == 16
    scores = [float(b[4]) for b, _ in sel]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(0.50)
    assert len(select_objects(raw, "single_object", GenEvalOptions(max_objects=3))["cup"]) == 3


def test_nms_off_at_1_and_on_below():
    raw = {"cup": [obj(0, 0, 10, 10, 0.9), obj(0, 0, 10, 10, 0.8), obj(50, 50, 60, 60, 0.7)]}
    assert len(select_objects(raw, "single_object")["cup"]) == 3
    assert len(select_objects(raw, "single_object", GenEvalOptions(max_overlap=0.5))["cup"]) == 2
    assert box_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)  # +1 pixel areas: 100+100-50


# ---------------------------------------------------------------- include / exclude / counting


def test_include_counts_and_two_objects():
    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}], "prompt": "p"}
    assert evaluate_metadata({"cat": boxes(1), "dog": boxes(1)}, meta)[0]
    ok, reason = evaluate_metadata({"cat": boxes(1)}, meta)
    assert not ok and "dog>=1, found 0" in reason


def test_counting_exact_with_exclude():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}], "prompt": "p"}
    assert not evaluate_metadata({"cup": boxes(2)}, meta)[0]
    assert evaluate_metadata({"cup": boxes(3)}, meta)[0]
    ok, reason = evaluate_metadata({"cup": boxes(4)}, meta)
    assert not ok and "cup<4, found 4" in reason
    # through the thresholds: the 4th cup at 0.9 exactly does not count, so three cups pass
    raw = {"cup": boxes(3, 0.95) + [obj(90, 0, 95, 5, 0.9)]}
    assert evaluate_metadata(select_objects(raw, "counting"), meta)[0]
    raw = {"cup": boxes(3, 0.95) + [obj(90, 0, 95, 5, 0.91)]}
    assert not evaluate_metadata(select_objects(raw, "counting"), meta)[0]


# ---------------------------------------------------------------- position


@pytest.mark.parametrize(
    "a_box, expected",
    [
        ((0, 40, 10, 50), {"left of"}),
        ((90, 40, 100, 50), {"right of"}),
        ((40, 0, 50, 10), {"above"}),
        ((40, 90, 50, 100), {"below"}),
        ((0, 0, 10, 10), {"left of", "above"}),  # exact diagonal: 0.707 > 0.5 on both axes
        ((40, 40, 50, 50), set()),  # same centre
    ],
)
def test_each_relation(a_box, expected):
    assert relative_position(a_box, (40, 40, 50, 50)) == expected


def test_position_shrink_boundary():
    b = (0, 0, 10, 10)
    # A of width 10 at horizontal offset d: shrink = 0.1 * (10 + 10) = 2. Offset 2 -> nothing left.
    assert relative_position((2, 0, 12, 10), b) == set()
    # then dx = (d - 2) / d must exceed 0.5: d = 4 gives exactly 0.5 (no relation), d = 4.5 passes
    assert relative_position((4, 0, 14, 10), b) == set()
    assert relative_position((4.5, 0, 14.5, 10), b) == {"right of"}
    assert relative_position((-4.5, 0, 5.5, 10), b) == {"left of"}
    # Shrink and the 0.5 cutoff: offset (10, 8), sizes 10 -> shrunk (8, 6) / |(10, 8)| = (0.625, 0.469)
    assert relative_position((10, 8, 20, 18), b) == {"right of"}
    # offset (10, 9): shrunk (8, 7) / 13.45 = (0.595, 0.520) -> both
    assert relative_position((10, 9, 20, 19), b) == {"right of", "below"}
    assert relative_position((4.5, 0, 14.5, 10), b, threshold=0.2) == set()  # the threshold is an option


def test_position_prompt_uses_group_zero_as_target():
    meta = {"tag": "position", "include": [{"class": "kite", "count": 1}, {"class": "cup", "count": 1, "position": ["above", 0]}], "prompt": "p"}
    kite, cup_above, cup_below = obj(40, 40, 50, 50), obj(40, 0, 50, 10), obj(40, 90, 50, 100)
    assert evaluate_metadata({"kite": [kite], "cup": [cup_above]}, meta)[0]
    ok, reason = evaluate_metadata({"kite": [kite], "cup": [cup_below]}, meta)
    assert not ok and "expected cup above target, found below target" in reason
    ok, reason = evaluate_metadata({"cup": [cup_above]}, meta)
    assert not ok and "no target for cup" in reason
    # only the most confident cup is checked
    assert evaluate_metadata({"kite": [kite], "cup": [cup_above, cup_below]}, meta)[0]


# ---------------------------------------------------------------- colour


def test_color_rules_with_stub_classifier():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bus", "count": 1, "color": "blue"}], "prompt": "p"}
    colors = {"car": "red", "bus": "blue"}
    calls = []

    def stub(objs, name):
        calls.append((name, len(objs)))
        return [colors[name]] * len(objs)

    assert evaluate_metadata({"car": boxes(2), "bus": boxes(1)}, meta, stub)[0]
    assert calls == [("car", 1), ("bus", 1)]  # only the top `count` objects are classified
    colors["bus"] = "green"
    ok, reason = evaluate_metadata({"car": boxes(1), "bus": boxes(1)}, meta, stub)
    assert not ok and "expected blue bus>=1, found 0 blue; and 1 green" in reason


def test_color_crop_masks_over_grey_and_crops():
    img = Image.new("RGB", (8, 6), (255, 0, 0))
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:4] = True
    crop = color_crop(img, [1, 1, 5, 4], mask)
    assert crop.size == (4, 3)
    assert crop.getpixel((1, 0)) == (255, 0, 0)  # inside the mask
    assert crop.getpixel((3, 2)) == (0x99, 0x99, 0x99)  # outside: grey #999
    with pytest.raises(ValueError):
        color_crop(img, [0, 0, 2, 2], np.zeros((3, 3), dtype=bool))


def test_tiny_open_clip_color_classifier():
    name = register_tiny_open_clip()
    clf = ColorClassifier(name, pretrained=None)
    assert ColorClassifier.templates("car") == ["a photo of a {c} car", "a photo of a {c}-colored car", "a photo of a {c} object"]
    text = clf.text_classifier("car")
    assert tuple(text.shape) == (32, 10)
    assert np.allclose(text.norm(dim=0).numpy(), 1.0, atol=1e-5)
    img = Image.new("RGB", (40, 30), (0, 0, 255))
    objs = [obj(0, 0, 20, 20), obj(10, 5, 40, 30)]
    logits = clf.logits([color_crop(img, b, m) for b, m in objs], "car")
    assert tuple(logits.shape) == (2, 10)
    labels = clf(img, objs, "car")
    assert labels == [["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"][i] for i in logits.argmax(1).tolist()]


# ---------------------------------------------------------------- summary and folders


def test_summary_arithmetic():
    def row(tag, meta, ok):
        return {"tag": tag, "metadata": json.dumps({"m": meta}), "correct": ok}

    rows = (
        [row("single_object", i, True) for i in range(4)]  # 1.0
        + [row("two_object", 0, True), row("two_object", 0, False), row("two_object", 1, False), row("two_object", 1, False)]  # 0.25
        + [row("counting", 0, False)] * 2  # 0.0
        + [row("colors", 0, True)]  # 1.0
        + [row("position", 0, True), row("position", 1, False)]  # 0.5
        + [row("color_attr", 0, False), row("color_attr", 1, True), row("color_attr", 2, True), row("color_attr", 3, True)]  # 0.75
    )
    s = summarize(rows)
    assert s.total_images == 17
    assert s.correct_images == pytest.approx(10 / 17)  # image-weighted
    assert s.overall == pytest.approx((1 + 0.25 + 0 + 1 + 0.5 + 0.75) / 6)  # task-weighted, not image-weighted
    assert s.tasks["two_object"] == {"accuracy": 0.25, "correct": 1, "images": 4}
    # prompts grouped by metadata string: metadata {"m": 0} appears across tags, so it is one prompt
    assert s.total_prompts == 4
    assert s.correct_prompts == pytest.approx(4 / 4)
    with pytest.raises(ValueError):
        summarize([])


class FakeDetector:
    name = "fake"
    official = False

    def detect(self, image, path=None):
        # one confident cat; a dog only in image 0
        out = {"cat": [obj(0, 0, 4, 4, 0.95)]}
        if path.endswith("0000.png"):
            out["dog"] = [obj(10, 10, 14, 14, 0.5)]
        return out


def test_evaluate_folder_official_layout(tmp_path):
    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}], "prompt": "a photo of a cat and a dog"}
    write_metadata(tmp_path, 0, meta)
    for k in range(2):
        Image.new("RGB", (16, 16)).save(sample_path(tmp_path, 0, k))
    assert (tmp_path / "00000" / "samples" / "0001.png").is_file()
    rows = evaluate_folder(tmp_path, FakeDetector(), outfile=tmp_path / "results.jsonl", progress=False)
    assert [r["correct"] for r in rows] == [True, False]
    assert list(rows[0]) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert json.loads(rows[0]["metadata"]) == meta
    assert json.loads(rows[0]["details"])["dog"] == [[10.0, 10.0, 14.0, 14.0, 0.5]]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    with pytest.raises(LayoutError):
        evaluate_folder(tmp_path / "00000" / "samples", FakeDetector(), progress=False)


def test_mask_to_box_exclusive_edge():
    m = np.zeros((10, 10), dtype=bool)
    m[2:5, 3:7] = True
    assert mask_to_box(m).tolist() == [3, 2, 7, 5]
    assert mask_to_box(np.zeros((4, 4), dtype=bool)).tolist() == [0, 0, 0, 0]
