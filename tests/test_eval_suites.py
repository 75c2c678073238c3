"""Suite loading and validation, prompt sources, seeds, win rates, and GenEval through run_eval with a
plug-in (non-diffusers) generator and a fake detector."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.evaluation.geneval import evaluate_folder, register_tiny_open_clip
from diffalign.evaluation.runner import ModelRun, run_eval, summarize_scores, win_rates
from diffalign.evaluation.suites import SuiteError, available_suites, load_suite
from diffalign.rewards.base import Scorer


def test_shipped_suites_validate():
    names = available_suites()
    assert {"geneval", "hpsv2", "pickapic_val", "partiprompts", "toyworld"} <= set(names)
    for n in names:
        s = load_suite(n)
        assert s.images_per_prompt >= 1 and s.steps >= 1
    g = load_suite("geneval")
    assert (g.images_per_prompt, g.steps, g.guidance, g.seeds.base, g.metrics) == (4, 50, 9.0, 42, ["geneval"])
    assert g.anchors["geneval"]["SD v1.5"]["overall"] == 0.43
    items = g.load_prompts()
    assert len(items) == 553 and items[0].metadata["tag"] == "single_object" and items[-1].group == "color_attr"
    assert [p.group for p in load_suite("hpsv2").prompts] == ["anime", "concept-art", "paintings", "photo"]


def _write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nprompts: {type: file, path: p.txt}\nstepz: 3\n", "stepz"),
        ("name: x\nprompts: {type: file, path: p.txt}\nsampler: magic\n", "unknown sampler"),
        ("name: x\nprompts: {type: nope}\n", "type"),
        ("name: x\nprompts: {type: file, path: p.txt}\nimages_per_prompt: 0\n", "images_per_prompt"),
        ("- just a list\n", "mapping"),
    ],
)
def test_invalid_suites_are_refused(tmp_path, text, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(_write(tmp_path, text))


def test_prompt_sources_file_jsonl_callable_hf(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    s = load_suite(_write(tmp_path, "name: a\nprompts: {type: file, path: p.txt, group: g}\n"))
    assert [(i.index, i.prompt, i.group, i.metadata) for i in s.load_prompts()] == [
        (0, "one", "g", {"prompt": "one", "group": "g"}),
        (1, "two", "g", {"prompt": "two", "group": "g"}),
    ]
    (tmp_path / "p.jsonl").write_text('{"text": "x", "k": 1}\n{"text": "y"}\n')
    s = load_suite(_write(tmp_path, "name: b\nprompts: {type: file, path: p.jsonl, field: text}\n"))
    assert [i.metadata for i in s.load_prompts()] == [{"prompt": "x", "k": 1}, {"prompt": "y"}]

    # callable sources run code: only with allow_code (tests/test_suite_security.py)
    s = load_suite(_write(tmp_path, "name: c\nprompts:\n  - {type: callable, target: 'tests.test_eval_suites:bad', kwargs: {n: 2}}\n"), allow_code=True)
    with pytest.raises(SuiteError, match="strings or dicts"):
        s.load_prompts()
    s = load_suite(_write(tmp_path, "name: c\nprompts: {type: callable, target: 'tests.test_eval_suites:toy_prompts'}\n"), allow_code=True)
    assert [i.prompt for i in s.load_prompts()] == ["a", "b", "c"]
    assert [i.prompt for i in s.load_prompts(limit=2)] == ["a", "b"]
    s = load_suite(_write(tmp_path, "name: c\nprompts: {type: callable, target: 'nowhere.mod:fn'}\n"), allow_code=True)
    with pytest.raises(SuiteError, match="cannot be imported"):
        s.load_prompts()

    import datasets

    datasets.Dataset.from_dict({"caption": ["p", "q", "p"], "style": ["s1", "s2", "s1"]}).save_to_disk(str(tmp_path / "ds"))
    s = load_suite(_write(tmp_path, f"name: d\nprompts: {{type: hf, dataset: '{tmp_path / 'ds'}', column: caption, group_column: style, unique: true}}\n"))
    assert [(i.prompt, i.group) for i in s.load_prompts()] == [("p", "s1"), ("q", "s2")]
    s = load_suite(_write(tmp_path, f"name: d\nprompts: {{type: hf, dataset: '{tmp_path / 'ds'}', column: nope}}\n"))
    with pytest.raises(SuiteError, match="no column"):
        s.load_prompts()


def bad(n):
    return list(range(n))


def toy_prompts():
    return ["a", {"prompt": "b", "shape": "square"}, "c"]


def test_seed_schemes(tmp_path):
    base = "name: a\nprompts: {type: file, path: p.txt}\nimages_per_prompt: 3\n"
    shared = load_suite(_write(tmp_path, base + "seeds: {base: 42}\n"))
    unique = load_suite(_write(tmp_path, base + "seeds: {base: 42, scheme: unique}\n"))
    assert [shared.seed_for(i, k) for i in (0, 5) for k in range(3)] == [42, 43, 44, 42, 43, 44]
    assert [unique.seed_for(i, k) for i in (0, 5) for k in range(3)] == [42, 43, 44, 57, 58, 59]


def _rows(model, values):
    return [{"index": i, "sample": k, "group": None, "scores": {"s": v, "loss": v}} for i, vs in enumerate(values) for k, v in enumerate(vs)]


def test_win_rates_and_summary_arithmetic():
    a = _rows("a", [[1.0, 3.0], [0.0, 0.0], [5.0, 5.0], [1.0, 1.0]])  # per-prompt means 2, 0, 5, 1
    b = _rows("b", [[2.0, 1.0], [1.0, 1.0], [5.0, 5.0], [0.0, 0.0]])  # 1.5, 1, 5, 0
    w = win_rates(a, b, {"loss": False})
    ci = (w["s"].pop("ci_low"), w["s"].pop("ci_high"))  # 95% Wilson interval (tests/test_report_html.py)
    assert ci[0] < 2.5 / 4 < ci[1]
    assert w["s"] == {"win_rate": (2 + 0.5) / 4, "wins": 2, "ties": 1, "losses": 1, "prompts": 4}
    assert w["loss"]["wins"] == 1 and w["loss"]["losses"] == 2  # lower is better flips the comparison
    s = summarize_scores(a)["s"]
    assert s["n"] == 8 and s["mean"] == pytest.approx(2.0)
    assert s["std"] == pytest.approx(np.std([1, 3, 0, 0, 5, 5, 1, 1], ddof=1))
    assert s["sem"] == pytest.approx(s["std"] / np.sqrt(8))


class Brightness(Scorer):
    name = "brightness"

    def _score_batch(self, images, prompts):
        return torch.tensor([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


class CatDetector:
    """Sees one cat in every image (and nothing else)."""

    name = "cat-detector"

    def detect(self, image, path=None):
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[:8, :8] = True
        return {"cat": [(np.array([0, 0, 8, 8, 0.95], dtype=np.float32), mask)]}

    def describe(self):
        return "fake cat detector (test)"


def test_geneval_suite_through_run_eval_with_plugin_generator(tmp_path):
    calls = []

    def solid(prompts, seeds):  # any (prompts, seeds) -> images callable plugs in
        calls.append(list(seeds))
        return [Image.new("RGB", (16, 16), (s * 10 % 255, 0, 0)) for s in seeds]

    suite = load_suite("geneval")
    suite = type(suite).model_validate({**suite.model_dump(), "images_per_prompt": 2})
    from diffalign.evaluation.geneval import ColorClassifier

    clf = ColorClassifier(register_tiny_open_clip(), pretrained=None)

    def geneval(image_dir):
        return evaluate_folder(image_dir, CatDetector(), clf, progress=False), CatDetector().describe()

    # prompts 0..79 are single objects; pick a limit that includes the single 'cat' prompt? use the first 3
    summary = run_eval(suite, [ModelRun("toy", solid)], {"brightness": Brightness()}, tmp_path, limit=3,
                       geneval=geneval, progress=False)  # fmt: skip
    assert calls == [[42, 43, 42, 43, 42, 43]]  # shared seeds: 42 + k for every prompt
    rows = [json.loads(x) for x in (tmp_path / "toy" / "geneval_results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["tag"] == "single_object" for r in rows)
    prompts = [json.loads(r["metadata"])["include"][0]["class"] for r in rows]
    assert [r["correct"] for r in rows] == [c == "cat" for c in prompts]
    g = summary["models"]["toy"]["geneval"]
    assert g["overall"] == pytest.approx(sum(c == "cat" for c in prompts) / 6)
    assert g["detector"] == "fake cat detector (test)"
    md = (tmp_path / "summary.md").read_text()
    assert "GenEval" in md and "fake cat detector (test)" in md
    assert "fake cat detector (test)" in (tmp_path / "report.html").read_text()
    # the metadata written next to the images is the official line for that prompt
    meta = json.loads((tmp_path / "toy" / "images" / "00000" / "metadata.jsonl").read_text())
    assert meta == {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
