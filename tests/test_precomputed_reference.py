"""train.reference=precomputed: energies computed ahead by `diffalign precompute` give the losses the
on-the-fly reference gives; a table made for another run is refused with one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_states_close, logged, run, tiny_config, trainable_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# adam_eps 1e-4 as in the cached == uncached test: the table is computed in batches of another size than
# training's, so energies agree to float rounding, and Adam's first update is sign-like on near-zero entries
CASES = {
    "dpo": dict(train={"max_steps": 3, "batch_size": 2}, optim={"lr": 1e-3, "adam_eps": 1e-4},
                data={"caption_dropout": 0.5, "random_flip": True}),
    "dcpo": dict(objective={"name": "dcpo"}, lora=None, optim={"lr": 1e-4, "adam_eps": 1e-4},
                 data={"format": "double_caption", "source": "builtin:double_caption", "resolution": 32,
                       "builtin_rows": 24}, train={"max_steps": 2, "batch_size": 2, "grad_accum": 2}),
    "rankdpo": dict(model={"pretrained": "tiny:sdxl"}, objective={"name": "rankdpo"}, optim={"lr": 1e-3, "adam_eps": 1e-4},
                    data={"format": "ranked", "source": "builtin:ranked", "resolution": 32, "builtin_rows": 16},
                    train={"max_steps": 2, "batch_size": 2}),
}  # fmt: skip


def _table(cfg: dict) -> Path:
    return Path(cfg["output_dir"]) / "cache" / "reference"


def _precompute(cfg: dict, *flags: str) -> None:
    """`diffalign precompute` on the config (default: one forward per training micro-batch slice, --batch 1)."""
    from diffalign.training.precompute import main

    path = cfg["output_dir"] + ".yaml"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    assert main([path, *(flags or ("--batch", "1"))]) == 0


@pytest.mark.parametrize("method", list(CASES))
def test_precomputed_reference_gives_the_on_the_fly_losses(tmp_path, method):
    """Same logged losses and reference errors, same trained weights; the run holds no reference module.
    Computed in larger batches than training's (--batch 5), the energies agree to float rounding."""
    from safetensors.torch import load_file

    from diffalign.training.reference import PrecomputedReference

    live = run(tiny_config(tmp_path / "live", **CASES[method]))
    cfg = tiny_config(tmp_path / "pre", **CASES[method])
    cfg["train"] = {**cfg["train"], "reference": "precomputed"}
    _precompute(cfg)
    pre = run(cfg)
    assert isinstance(pre.reference, PrecomputedReference) and not hasattr(pre.reference, "module")
    a, b = logged(tiny_config(tmp_path / "live")), logged(cfg)
    assert len(a) == len(b) == cfg["train"]["max_steps"]
    for x, y in zip(a, b, strict=True):
        keys = [k for k in x if k == "loss" or k.startswith("ref_") or "margin" in k]
        assert "loss" in keys and len(keys) > 1, keys
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=2e-5, abs=1e-7), (method, x["step"], k)
    assert_states_close(trainable_state(live), trainable_state(pre), atol=1e-4, rtol=0)

    exact = load_file(str(_table(cfg) / "energies.safetensors"))["energies"]
    _precompute(cfg, "--batch", "5")
    batched = load_file(str(_table(cfg) / "energies.safetensors"))["energies"]
    assert not exact.isnan().any()
    torch.testing.assert_close(batched, exact, rtol=1e-5, atol=0)


def test_a_table_from_another_run_is_refused(tmp_path):
    from diffalign.config import load_config
    from diffalign.training.reference import ReferenceEnergiesMismatch
    from diffalign.training.trainer import Trainer

    base = tiny_config(tmp_path / "run", **CASES["rankdpo"])
    base["train"] = {**base["train"], "reference": "precomputed"}
    _precompute(base)
    table = _table(base) / "manifest.json"

    def refused(match: str, **change) -> None:
        cfg = json.loads(json.dumps(base))
        for section, values in change.items():
            cfg[section] = {**cfg[section], **values} if isinstance(values, dict) else values
        with pytest.raises(ReferenceEnergiesMismatch, match=match) as err:
            Trainer(load_config(cfg))
        assert str(table) in str(err.value) and "diffalign precompute" in str(err.value)
        assert "\n" not in str(err.value)

    refused("seed: computed with 0, config has 1", train={"seed": 1})
    refused("batch_size", train={"batch_size": 4})
    refused("builtin_rows", data={"builtin_rows": 24})
    refused("model", model={"pretrained": "tiny:sd"})
    refused("noise: computed with 'per_image', config has 'shared'", objective={"name": "rankdpo", "noise": "shared"})
    refused("covers 2 micro-batches and this run takes 3", train={"max_steps": 3})
    Trainer(load_config(base))  # the same run is accepted

    _precompute(base, "--processes", "2")
    refused("processes: computed with 2, config has 1")


def test_a_changed_item_is_caught_when_read(tmp_path):
    """The data's content changed under the same config: the key check names the position."""
    from diffalign.training.reference import ReferenceEnergiesMismatch

    cfg = tiny_config(tmp_path / "run", train={"max_steps": 1, "reference": "precomputed"})
    _precompute(cfg)
    manifest = _table(cfg) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["keys"] = [None if k is None else k + "-old" for k in m["keys"]]
    manifest.write_text(json.dumps(m))
    with pytest.raises(ReferenceEnergiesMismatch, match="at stream position 0 and this run reads"):
        run(cfg)


def test_sampled_experience_and_reference_free_objectives_are_refused(tmp_path):
    from diffalign.config import load_config
    from diffalign.configio import ConfigError
    from diffalign.training.precompute import build_reference_energies

    seppo = tiny_config(tmp_path, objective={"name": "seppo"}, train={"reference": "precomputed"})
    with pytest.raises(ValueError, match="generated experience is sampled during training"):
        load_config(seppo)
    with pytest.raises(FileNotFoundError, match="diffalign precompute"):
        run(tiny_config(tmp_path / "none", train={"reference": "precomputed"}))
    with pytest.raises(ConfigError, match="nothing to precompute"):
        build_reference_energies(load_config(tiny_config(tmp_path, objective={"name": "mapo"})))


def test_two_processes_read_their_own_slices(tmp_path):
    """A table computed for 2 processes x batch 1 serves a torchrun run that matches 1 process x batch 2 with
    the live reference (the invariant and tolerance of the 2-process training test)."""
    from tests.helpers import assert_one_process_equals_two

    adam = {"lr": 1e-3, "adam_eps": 1e-4}
    one = tiny_config(tmp_path / "one", optim=adam, train={"batch_size": 2, "max_steps": 2})
    two = tiny_config(tmp_path / "two", optim=adam, train={"batch_size": 1, "max_steps": 2, "reference": "precomputed"})
    _precompute(two, "--processes", "2", "--batch", "1")
    assert_one_process_equals_two(one, two, tmp_path)
