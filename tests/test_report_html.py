"""report.html: real HTML tables (not markdown in <pre>), win rates with 95% intervals, no histogram for
binary scorers, thumbnails large enough to read (tiny images upscaled with pixelated rendering)."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.evaluation.runner import ModelRun, run_eval
from diffalign.evaluation.stats import wilson_interval
from diffalign.evaluation.suites import load_suite
from diffalign.rewards.base import Scorer


class Brightness(Scorer):
    name = "brightness"

    def _score_batch(self, images, prompts):
        return torch.tensor([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


class Bright(Scorer):
    """1 when the image is brighter than mid grey: a pass / fail scorer."""

    name = "bright"
    binary = True

    def _score_batch(self, images, prompts):
        return torch.tensor([float(np.asarray(im, dtype=np.float32).mean() > 127.5) for im in images])


class Page(HTMLParser):
    """The tables (header cells, body rows) and images of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.pre = [], [], []
        self._cell = None
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"headers": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = (tag, [])
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)
        if self._in_pre:
            self.pre[-1] += data

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            text = "".join(self._cell[1]).strip()
            if self._cell[0] == "th":
                self.tables[-1]["headers"].append(text)
            else:
                self.tables[-1]["rows"][-1].append(text)
            self._cell = None
        elif tag == "pre":
            self._in_pre = False


def _suite(tmp_path):
    (tmp_path / "p.txt").write_text("dark\nlight\ngrey\n", encoding="utf-8")
    (tmp_path / "s.yaml").write_text("name: shades\nprompts: {type: file, path: p.txt}\nimages_per_prompt: 4\n", encoding="utf-8")
    return load_suite(tmp_path / "s.yaml")


def _generator(offset):
    def gen(prompts, seeds):
        return [Image.new("RGB", (16, 16), ((s * 37 + offset) % 256,) * 3) for s in seeds]

    return gen


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    summary = run_eval(_suite(tmp_path), [ModelRun("a", _generator(90)), ModelRun("b", _generator(0))],
                       {"brightness": Brightness(), "bright": Bright()}, tmp_path / "out", progress=False)  # fmt: skip
    page = Page()
    page.feed((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    return summary, page, (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")


def test_summary_is_html_tables_not_markdown(report):
    summary, page, _ = report
    headers = [t["headers"] for t in page.tables]
    assert ["model", "bright (mean ± sem)", "brightness (mean ± sem)", "images"] in headers
    scores = next(t for t in page.tables if t["headers"][0] == "model")
    body = [r for r in scores["rows"] if r]
    assert [r[0] for r in body] == ["a", "b"] and [r[-1] for r in body] == ["12", "12"]
    mean = summary["models"]["a"]["scores"]["brightness"]["mean"]
    assert body[0][2].startswith(f"{mean:.4f} ± ")
    assert not any("|---" in p for p in page.pre)  # no markdown table left in a <pre>


def test_win_rates_table_has_a_95_percent_interval(report):
    summary, page, md = report
    table = next(t for t in page.tables if t["headers"][:3] == ["scorer", "win rate", "95% CI"])
    rows = {r[0]: r for r in table["rows"] if r}
    w = summary["comparison"]["win_rates"]["brightness"]
    assert w["ci_low"] <= w["win_rate"] <= w["ci_high"] and 0 <= w["ci_low"] < w["ci_high"] <= 1
    assert rows["brightness"][2] == f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
    assert "95% CI" in md and f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}]" in md
    assert any(t["headers"][:1] == ["scorer"] and "p-value" in t["headers"] for t in page.tables)  # McNemar


def test_binary_scorer_gets_a_rate_not_a_histogram(report):
    _, page, _ = report
    kinds = {(i.get("data-scorer"), i.get("data-kind")) for i in page.images if i.get("class") == "plot"}
    assert ("bright", "rate") in kinds and ("brightness", "mean+histogram") in kinds
    assert ("bright", "mean+histogram") not in kinds


def test_tiny_images_are_upscaled_pixelated(report):
    _, page, _ = report
    thumbs = [i for i in page.images if "thumb" in i.get("class", "")]
    assert len(thumbs) == 2 * 3 * 4
    assert all("pixelated" in i["class"] and int(i["width"]) >= 128 and int(i["width"]) % 16 == 0 for i in thumbs)
    assert all(i["src"].startswith("data:image/png;base64,") for i in thumbs)  # lossless for tiny images


def test_large_images_are_shrunk_not_pixelated(tmp_path):
    from diffalign.evaluation.report import THUMB_MAX, write_html_report

    Image.new("RGB", (640, 480), (10, 200, 30)).save(tmp_path / "big.png")
    rows = [{"index": 0, "sample": 0, "prompt": "p", "group": None, "image": "big.png", "scores": {"s": 0.5}}]
    summary = {"suite": "x", "prompts": 1, "images_per_prompt": 1, "models": {"m": {"scores": {}}}}
    page = Page()
    page.feed(write_html_report(summary, {"m": rows}, tmp_path).read_text(encoding="utf-8"))
    (thumb,) = [i for i in page.images if "thumb" in i.get("class", "")]
    assert "pixelated" not in thumb["class"] and (int(thumb["width"]), int(thumb["height"])) == (THUMB_MAX, 192)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (57, 120), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_wilson_interval_edges():
    assert all(np.isnan(wilson_interval(0, 0)))
    lo, hi = wilson_interval(2.5, 4)  # ties counted half
    assert lo < 2.5 / 4 < hi
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    json.dumps(wilson_interval(1, 2))  # plain floats, fit for summary.json
