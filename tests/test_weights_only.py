"""Third-party checkpoints are never unpickled with code: every torch.load in the package passes
weights_only=True, nothing calls pickle / np.load(allow_pickle=True), and the shared loader refuses a
file whose pickle would call a function."""

import ast
import pickle
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "diffalign"
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
              ("dill", "loads"), ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads")}  # fmt: skip


def _calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                yield path.relative_to(PACKAGE.parent), node, (node.func.value.id, node.func.attr)


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "not a constant"
    return None


def test_every_torch_load_passes_weights_only_true_and_nothing_unpickles():
    bad, loads = [], 0
    for path, node, (mod, attr) in _calls():
        where = f"{path}:{node.lineno}"
        if (mod, attr) == ("torch", "load"):
            loads += 1
            if _kw(node, "weights_only") is not True:
                bad.append(f"{where}: torch.load without weights_only=True")
        elif (mod, attr) in UNPICKLERS:
            bad.append(f"{where}: {mod}.{attr} unpickles arbitrary objects")
        elif (mod, attr) == ("np", "load") and _kw(node, "allow_pickle") is not None:
            bad.append(f"{where}: np.load with allow_pickle")
    assert not bad, bad
    assert loads >= 1  # the scan sees the package's one loader (rewards/_common.py)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_the_shared_loader_refuses_a_pickle_that_calls_a_function(tmp_path, capsys):
    from diffalign.rewards._common import load_torch_state_dict

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_torch_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert torch.equal(load_torch_state_dict(tmp_path / "ok.pt")["w"], torch.ones(2))
