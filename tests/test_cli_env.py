"""`diffalign --version` and `diffalign env` (the environment report for bug reports)."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffalign
from diffalign.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag(flag, capsys):
    assert main([flag]) == 0
    assert capsys.readouterr().out.strip() == f"diffalign {diffalign.__version__}"


def test_version_from_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "diffalign", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == f"diffalign {diffalign.__version__}"


def test_pyproject_takes_its_version_from_the_package():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in text and 'attr = "diffalign.__version__"' in text


def test_env_reports_versions_cuda_and_extras(capsys):
    assert main(["env"]) == 0
    lines = dict(line[2:].split(": ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("- "))
    assert lines["diffalign"].startswith(diffalign.__version__)
    assert lines["PyTorch"] == torch.__version__
    assert lines["CUDA available"] == str(torch.cuda.is_available())
    for dist, label in [("diffusers", "diffusers"), ("transformers", "transformers"), ("accelerate", "accelerate"),
                        ("peft", "peft")]:  # fmt: skip
        assert lines[label] == md.version(dist)
    for extra in ("xformers", "bitsandbytes", "wandb", "triton"):
        (value,) = [v for k, v in lines.items() if k.startswith(f"{extra} (")]
        installed = importlib_find(extra)
        assert (value == "not installed") == (not installed), (extra, value)


def importlib_find(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_env_is_listed_and_has_help(capsys):
    assert main([]) == 0
    assert "  env " in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["env", "--help"])
    assert e.value.code == 0
