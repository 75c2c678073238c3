"""What a run checks before it loads a model, and the run-time errors that read like the config errors:
one line naming the file / id and the fix, exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_helpers import builtin_cache, jpeg, pickapic_table, solid, write  # noqa: F401

from diffalign.cli import main
from tests.helpers import tiny_config

GOOD = jpeg(solid((255, 0, 0), (32, 32)))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: these checks come first."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr("diffalign.training.trainer.load_backbone", refuse)
    monkeypatch.setattr("diffalign.backbones.load_backbone", refuse)


def _pickapic(tmp_path, images: list[bytes]) -> str:
    rows = [{"caption": f"c{i}", "jpg_0": im, "jpg_1": GOOD, "label_0": 1.0} for i, im in enumerate(images)]
    return write(pickapic_table(rows), tmp_path / "pairs.parquet")


def _train(tmp_path, capsys, data: dict, *extra) -> tuple[int, str]:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, data={**data, "resolution": 16}, train={"max_steps": 2})))
    rc = main(["train", str(cfg), *extra])
    return rc, capsys.readouterr().err.strip()


def test_all_images_corrupt_stops_before_the_model_loads(tmp_path, capsys, no_model):
    source = _pickapic(tmp_path, [b"\xff\xd8 not a jpeg"] * 6)
    rc, err = _train(tmp_path, capsys, {"format": "pickapic", "source": source})
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "6 of 6" in err and "corrupt_image 6" in err and "data.max_skip_fraction" in err and source in err
    assert not (Path(tmp_path) / "run" / "final").exists()


def test_every_jsonl_path_a_url_stops_with_the_counts(tmp_path, capsys, no_model):
    lines = [{"prompt": f"p{i}", "chosen": f"https://example.com/{i}a.png", "rejected": f"https://example.com/{i}b.png"}
             for i in range(4)]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, err = _train(tmp_path, capsys, {"format": "jsonl", "source": str(tmp_path / "pairs.jsonl")})
    assert rc == 2 and "4 of 4" in err and "missing_file 4" in err and "https://example.com/0a.png" in err, err


def test_cache_on_all_bad_data_fails_and_writes_no_index(tmp_path, capsys, no_model):
    source = _pickapic(tmp_path, [b""] * 3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, data={"format": "pickapic", "source": source, "resolution": 16})))
    assert main(["cache", str(cfg), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 of 3" in err and "missing_image 3" in err, err
    assert not (tmp_path / "run" / "cache" / "index.json").exists()


def test_a_skip_share_over_the_threshold_stops_a_running_run(tmp_path, capsys, monkeypatch):
    from diffalign.training import preflight

    monkeypatch.setattr(preflight, "PROBE_ITEMS", 4)  # the probe sees the 4 good items, training the rest
    source = _pickapic(tmp_path, [GOOD] * 4 + [b"broken"] * 12)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, data={"format": "pickapic", "source": source, "resolution": 16,
                                                              "max_skip_fraction": 0.5},
                                              train={"max_steps": 8, "batch_size": 4}, logging={"every": 1})))  # fmt: skip
    assert main(["train", str(cfg)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffalign train:")]
    assert len(err) == 1, err
    err = err[0]
    assert "skipped" in err and "data.max_skip_fraction=0.5" in err and source in err, err
    # and the same data passes with a looser threshold
    assert main(["train", str(cfg), "data.max_skip_fraction=1.0", "train.max_steps=2", "--overwrite"]) == 0

