import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffalign.data.phi import ranks_from_phi, soft_preference
from diffalign.data.schema import RANKED_COLUMNS
from diffalign.synpic.config import ConfigError, load_config
from diffalign.synpic.run import build_generators, run, shard_files
from diffalign.toy.generators import ToyRenderGenerator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = Path(__file__).resolve().parents[1]
RAW = {
    "prompts": {"source": "toy", "repeats": 2},  # 36 rows
    "generators": [
        {"type": "toy_render", "name": "clean"},
        {"type": "toy_render", "name": "noisy", "corrupt_p": 0.6, "images_per_prompt": 3},
    ],
    "scorers": ["toy"],
    "seed": 11,
    "shard_size": 8,  # 5 shards, the last one short
}


def _cfg(out, **extra):
    return load_config(raw={**RAW, "output_dir": str(out), **extra})


def _rows(out):
    import pyarrow.parquet as pq

    rows = [r for f in shard_files(out) for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: r["seeds"][0])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("synpic") / "full"
    summary = run(_cfg(out), progress=False)
    return out, summary


def test_rows_follow_the_ranked_schema(baseline):
    import datasets

    out, summary = baseline
    ds = datasets.load_dataset("parquet", data_files=shard_files(out), split="train")
    assert tuple(ds.column_names) == RANKED_COLUMNS and len(ds) == 36
    seeds = sorted(s for r in ds["seeds"] for s in r)
    assert seeds == list(range(11, 11 + 36 * 4))  # seed + row * k + j, each once
    row = ds[0]
    assert row["prompt"] == "a red circle" and row["generators"] == ["clean", "noisy", "noisy", "noisy"]
    img = Image.open(io.BytesIO(row["images"][0]))
    assert img.format == "PNG" and img.size == (16, 16)
    for r in ds:
        phi = soft_preference(np.array([r["scores"]["toy"]]))
        assert np.allclose(r["phi"], phi) and r["rank"] == ranks_from_phi(phi).tolist()
    # the clean renderer wins more often than the corrupting one
    assert summary["generators"]["clean"]["mean_phi"] > summary["generators"]["noisy"]["mean_phi"]
    assert (out / "summary.md").exists() and json.loads((out / "summary.json").read_text())["rows"] == 36


class _Failing:
    """Wraps a generator and raises on its `fail_on`-th call (a crash in the middle of a run)."""

    def __init__(self, inner, fail_on):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.name, self.images_per_prompt = inner.name, inner.images_per_prompt

    def generate(self, prompts, seeds):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("killed")
        return self.inner.generate(prompts, seeds)


def test_killed_run_resumes_to_the_same_rows(tmp_path, baseline):
    cfg = _cfg(tmp_path / "resumed")
    gens = build_generators(cfg)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, generators=[gens[0], _Failing(gens[1], fail_on=3)], progress=False)
    assert [Path(f).name for f in shard_files(cfg.output_dir)] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    # a kill between the rename and the manifest line, and a temp file left behind
    manifest = Path(cfg.output_dir) / "manifest" / "rank-0.jsonl"
    manifest.write_text(manifest.read_text().splitlines()[0] + '\n{"shard": 1, "fi')
    (Path(cfg.output_dir) / "data" / ".shard-00002.parquet.tmp-1").write_bytes(b"partial")
    gens = build_generators(cfg)
    counting = _Failing(gens[0], fail_on=-1)
    summary = run(cfg, generators=[counting, gens[1]], progress=False)
    assert counting.calls == 4  # shards 1-4 redone, shard 0 kept
    assert summary["run"]["shards_this_run"] == 4
    assert _rows(cfg.output_dir) == _rows(baseline[0])
    assert not list((Path(cfg.output_dir) / "data").glob(".*tmp*"))
    # a finished run restarted does nothing
    assert run(cfg, progress=False)["run"]["shards_this_run"] == 0
    assert _rows(cfg.output_dir) == _rows(baseline[0])
    # a shard file deleted by hand is redone even though a manifest lists it
    (Path(cfg.output_dir) / "data" / "shard-00003.parquet").unlink()
    assert run(cfg, progress=False)["run"]["shards_this_run"] == 1
    assert _rows(cfg.output_dir) == _rows(baseline[0])


def test_a_different_config_is_refused_in_the_same_dir(tmp_path, baseline):
    out = tmp_path / "copy"
    shutil.copytree(baseline[0], out)
    with pytest.raises(ConfigError, match="different Syn-Pic run"):
        run(_cfg(out, seed=12), progress=False)
    assert run(_cfg(out, seed=12), overwrite=True, progress=False)["rows"] == 36


def test_a_kill_while_writing_run_json_does_not_break_the_rerun(tmp_path, monkeypatch):
    """The first file a run writes is run.json; a kill in the middle of writing it (the file opened, so
    emptied, and nothing written) must not leave an empty run.json that every rerun then trips over."""
    cfg = _cfg(tmp_path / "killed", prompts={"source": "toy", "limit": 2})

    def killed(self, *args, **kwargs):
        open(self, "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    monkeypatch.undo()
    assert not (Path(cfg.output_dir) / "run.json").exists()
    assert not list(Path(cfg.output_dir).glob(".*tmp*"))
    assert run(cfg, progress=False)["rows"] == 2


def test_an_unreadable_run_json_says_what_to_do(tmp_path, capsys):
    """An empty run.json, as an older version could leave, is one clear line naming it and --overwrite."""
    from diffalign.synpic.cli import main

    out = tmp_path / "old"
    out.mkdir()
    (out / "run.json").write_text("")
    cfg_file = tmp_path / "synpic.yaml"
    cfg_file.write_text(yaml.safe_dump({**RAW, "prompts": {"source": "toy", "limit": 2}}))
    assert main([str(cfg_file), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out / "run.json") in err and "--overwrite" in err, err
    assert main([str(cfg_file), "--out", str(out), "--no-progress", "--overwrite"]) == 0


def _cli_env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def test_two_processes_give_the_same_rows_as_one(tmp_path, baseline):
    cfg_file = tmp_path / "synpic.yaml"
    cfg_file.write_text(yaml.safe_dump({**RAW, "output_dir": str(tmp_path / "unused")}))
    one = subprocess.run(
        [sys.executable, "-m", "diffalign", "synpic", str(cfg_file), "--out", str(tmp_path / "one"), "--no-progress"],
        cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert "Syn-Pic summary" in one.stdout
    accelerate = Path(sys.executable).with_name("accelerate")
    # `--cpu` makes accelerate's launcher start a single process; --multi_gpu starts torchrun-style
    # processes, which join a gloo group because diffalign creates PartialState(cpu=True) without CUDA.
    two = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         "-m", "diffalign", "synpic", str(cfg_file), "--out", str(tmp_path / "two"), "--no-progress"],
        cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    processes = {
        json.loads(line)["process"]
        for f in (tmp_path / "two" / "manifest").glob("*.jsonl")
        for line in f.read_text().splitlines()
    }
    assert processes == {0, 1}
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["run"]["processes"] == 2
    assert _rows(tmp_path / "one") == _rows(baseline[0]) == _rows(tmp_path / "two")


def test_cli_reports_config_errors(tmp_path):
    from diffalign.synpic.cli import main

    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump({**RAW, "seeed": 1}))
    assert main([str(cfg_file), "--out", str(tmp_path / "o")]) == 2


def test_neural_generators(tmp_path):
    """A tiny diffusers pipeline (from a folder) and the toy sampler, side by side."""
    from diffalign.backbones.tiny import save_tiny_pipeline

    pipe = save_tiny_pipeline(tmp_path / "tiny_sd")
    raw = {
        "prompts": {"source": "list", "items": ["a red circle", "a blue square", "a cyan triangle"]},
        "generators": [
            {"type": "diffusers", "model": str(pipe), "name": "tiny-sd", "steps": 2, "guidance": 3.0,
             "resolution": 32, "scheduler": "DDIMScheduler"},
            {"type": "toy_sampler", "width": 8, "steps": 2},
            {"type": "toy_render", "size": 32},
        ],
        "scorers": ["toy"],
        "shard_size": 2,
        "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    cfg = load_config(raw=raw)
    summary = run(cfg, progress=False)
    rows = _rows(cfg.output_dir)
    assert len(rows) == 3 and rows[0]["generators"] == ["tiny-sd", "toy-sampler", "toy-render"]
    sizes = [Image.open(io.BytesIO(b)).size for b in rows[0]["images"]]
    assert sizes == [(32, 32), (16, 16), (32, 32)]
    assert summary["generators"]["toy-render"]["mean_phi"] > summary["generators"]["tiny-sd"]["mean_phi"]
    # the same seeds give the same images again
    again = run(load_config(raw={**raw, "output_dir": str(tmp_path / "again")}), progress=False)
    assert again["rows"] == 3 and _rows(tmp_path / "again") == rows


def test_render_generator_is_seed_deterministic():
    g = ToyRenderGenerator(corrupt_p=0.5)
    a = g.generate(["a red circle"] * 4, [1, 2, 3, 4])
    b = g.generate(["a red circle"] * 2, [3, 4])
    assert [np.asarray(x).tobytes() for x in a[2:]] == [np.asarray(x).tobytes() for x in b]


def test_agreement_between_scorers(tmp_path):
    from diffalign.rewards.base import Scorer
    from diffalign.synpic.run import build_scorers
    from diffalign.synpic.summary import agreement

    a = agreement(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 3.0, 2.0]]))
    assert a["pairwise_order_agreement"] == pytest.approx(2 / 3) and a["kendall_tau_mean"] == pytest.approx(
        1 / 3
    )

    class Reversed(Scorer):  # ranks every prompt's images in the opposite order
        name = "reversed"

        def _score_batch(self, images, prompts):
            return -toy.score(images, prompts)

    cfg = _cfg(tmp_path / "two_scorers", prompts={"source": "toy"})
    (toy,) = build_scorers(cfg)
    summary = run(cfg, scorers=[toy, Reversed()], progress=False)
    pair = summary["agreement"]["toy vs reversed"]
    assert pair["pairwise_order_agreement"] == 0.0 and pair["kendall_tau_mean"] == pytest.approx(-1.0)
    assert "| toy vs reversed | 0.000 |" in (tmp_path / "two_scorers" / "summary.md").read_text()
    # every image wins exactly the comparisons it loses under the other scorer: phi = 1/2 unless tied
    rows = _rows(tmp_path / "two_scorers")
    assert all(p <= 0.5 for r in rows for p in r["phi"])
