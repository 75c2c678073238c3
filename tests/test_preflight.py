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

    monkeypatch.setattr("diffalign.backbones.registry.load_backbone", refuse)  # what backbone_from_config calls
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


# ---- run-time errors named by the issue -----------------------------------------------------------------


def _cfg(tmp_path, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    return path


def _fails(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_a_missing_local_dataset(tmp_path, capsys, no_model):
    missing = str(tmp_path / "nope" / "pairs.parquet")
    _fails(capsys, ["train", str(_cfg(tmp_path)), f"data.source={missing}"], missing, "does not exist")


def test_a_hub_model_while_offline_says_offline(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = _fails(capsys, ["train", str(_cfg(tmp_path)), "model.pretrained=someorg/some-model"],
                 "'someorg/some-model'", "offline", "HF_HUB_OFFLINE", "hf download someorg/some-model")  # fmt: skip
    assert "does not appear to have" not in err
    _fails(capsys, ["train", str(_cfg(tmp_path)), f"model.pretrained={tmp_path / 'no-model'}"], "no-model", "does not exist")


@pytest.mark.parametrize("extra,override", [("wandb", "logging.wandb=true"), ("xformers", "train.attention=xformers"),
                                            ("bnb", "optim.optimizer=adamw8bit")])  # fmt: skip
def test_a_missing_extra_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model, extra, override):
    import sys

    module = {"bnb": "bitsandbytes"}.get(extra, extra)
    monkeypatch.setitem(sys.modules, module, None)  # an import of it raises ImportError
    _fails(capsys, ["train", str(_cfg(tmp_path)), override], override, f"pip install 'diffalign[{extra}]'")


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 1-step DPO run with a checkpoint and a latent cache, shared by the resume and truncation cases."""
    from diffalign.config import load_config
    from diffalign.training.cache import build_cache
    from tests.helpers import run

    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tmp, train={"max_steps": 1}, checkpoint={"every": 1})
    build_cache(load_config(cfg), device="cpu")
    run(cfg)
    return tmp, cfg


def _copy(checkpointed, tmp_path) -> tuple[Path, dict]:
    import shutil

    src, cfg = checkpointed
    shutil.copytree(src / "run", tmp_path / "run")
    cfg = tiny_config(tmp_path, train={"max_steps": 2}, checkpoint={"every": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.mark.parametrize("name", ["lora_0.safetensors", "optimizer.bin", "trainer_state.json"])
def test_a_truncated_checkpoint_file_is_named(tmp_path, capsys, checkpointed, no_model, name):
    cfg_file, _ = _copy(checkpointed, tmp_path)
    f = tmp_path / "run" / "checkpoints" / "step-0000001" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(capsys, ["train", str(cfg_file), "--resume", "latest"], str(f), "truncated" if name != "trainer_state.json" else "unreadable")


def test_a_truncated_cache_shard_is_named(tmp_path, capsys, checkpointed, no_model):
    cfg_file, _ = _copy(checkpointed, tmp_path)
    shard = sorted((tmp_path / "run" / "cache").glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(capsys, ["train", str(cfg_file), "cache.enabled=true", "--overwrite"], str(shard), "diffalign cache")


def test_resume_cases(tmp_path, capsys, checkpointed, no_model):
    cfg_file, _ = _copy(checkpointed, tmp_path)
    missing = tmp_path / "run" / "checkpoints" / "step-0000999"
    _fails(capsys, ["train", str(cfg_file), "--resume", str(missing)], str(missing), "--resume latest")


def test_resume_latest_in_an_empty_folder_starts_fresh(tmp_path, capsys):
    assert main(["train", str(_cfg(tmp_path, train={"max_steps": 1})), "--resume", "latest"]) == 0
    assert "starting fresh" in capsys.readouterr().out


def test_resume_under_another_objective_warns(tmp_path, caplog, checkpointed):
    cfg_file, _ = _copy(checkpointed, tmp_path)
    with caplog.at_level("WARNING"):
        assert main(["train", str(cfg_file), "--resume", "latest", "objective.name=mapo"]) == 0
    msg = [r.getMessage() for r in caplog.records if "objective" in r.getMessage()]
    assert msg and "dpo (beta=5000.0" in msg[0] and "mapo (beta=0.1" in msg[0], msg


def test_toy_synpic_before_the_demo_says_run_the_demo(tmp_path, capsys):
    root = Path(__file__).resolve().parents[1]
    base = tmp_path / "runs" / "demo" / "base"
    _fails(capsys, ["synpic", str(root / "configs" / "toy_synpic.yaml"), "--out", str(tmp_path / "s"),
                    f"generators.0.unet={base}", "--no-progress"], str(base), "run `diffalign demo`")  # fmt: skip
