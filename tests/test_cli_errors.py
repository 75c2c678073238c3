"""The `diffalign` command line: overrides anywhere, known errors as one line with exit 2 (a traceback only
with --debug)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffalign.cli import main
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _config_file(tmp_path, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_overrides_after_a_flag_are_accepted(tmp_path, capsys):
    cfg = _config_file(tmp_path)
    out = tmp_path / "elsewhere"
    assert main(["train", str(cfg), "--output-dir", str(out), "train.max_steps=1", "logging.tensorboard=false"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 1
    # cache and synpic take overrides anywhere too: a misspelt one is read as an override (a config error
    # naming the key), not refused by argparse as an unrecognised argument
    assert main(["cache", str(cfg), "--device", "cpu", "cache.dri=x"]) == 2
    assert "unknown key 'cache.dri'. Did you mean 'cache.dir'?" in capsys.readouterr().err
    synpic = tmp_path / "synpic.yaml"
    synpic.write_text((ROOT / "configs" / "toy_synpic.yaml").read_text())
    assert main(["synpic", str(synpic), "--out", str(tmp_path / "s"), "seeed=1"]) == 2
    assert "unknown key 'seeed'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,hint", [
    (["--train.max_steps=4"], "write train.max_steps=4"),
    (["--train.max_steps", "4"], "write train.max_steps=4"),
    (["--objective.beta=2500", "--output-dir", "x"], "write objective.beta=2500"),
])  # fmt: skip
def test_a_dotted_option_gets_a_hint(tmp_path, capsys, argv, hint):
    assert main(["train", str(_config_file(tmp_path)), *argv]) == 2
    err = _one_line(capsys)
    assert err.startswith("diffalign train: ") and hint in err and "no dashes" in err


def test_debug_shows_the_traceback_of_a_known_error(tmp_path, capsys):
    from diffalign.configio import ConfigError

    cfg = _config_file(tmp_path)
    assert main(["train", str(cfg), "train.max_stepz=1"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    for argv in (["train", str(cfg), "train.max_stepz=1", "--debug"], ["--debug", "train", str(cfg), "train.max_stepz=1"]):
        with pytest.raises(ConfigError, match="max_stepz"):
            main(argv)
