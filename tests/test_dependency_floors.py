"""The dependency floors in pyproject.toml exclude releases with known code-execution bugs in the paths
diffalign uses to read third-party files, and the environment the tests run in satisfies them."""

import importlib.metadata as md
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _deps() -> dict[str, Requirement]:
    data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


@pytest.mark.parametrize(
    "name, vulnerable",
    [
        ("torch", "2.5.1"),  # CVE-2025-32434: torch.load(weights_only=True) bypass, fixed in 2.6
        ("torch", "2.9.1"),  # CVE-2026-24747: weights_only unpickler memory corruption, fixed in 2.10
        ("torchvision", "0.24.1"),  # built for torch 2.9
        ("transformers", "5.2.0"),  # CVE-2026-4372: config.json code execution, fixed in 5.3
        ("open-clip-torch", "2.26.1"),  # relied on torch's weights_only default (unsafe before torch 2.6)
        ("pillow", "10.2.0"),  # CVE-2024-28219, fixed in 10.3
    ],
)
def test_floor_excludes_the_vulnerable_release(name, vulnerable):
    spec = _deps()[name].specifier
    assert not spec.contains(vulnerable), f"{name} {vulnerable} is still allowed by {spec}"


def test_installed_versions_satisfy_every_floor():
    bad = []
    for name, req in _deps().items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            bad.append(f"{name} not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{name} {version} does not satisfy {req}")
    assert not bad, bad
