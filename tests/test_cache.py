"""The latent/text cache: training from it equals training from pixels; a stale cache is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import assert_states_close, run, tiny_config, trainable_state


def _logged(trainer) -> list[dict]:
    path = trainer.out / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cached_training_equals_uncached(tmp_path, family):
    """Same items, flips, caption dropout, posterior samples and noise: the per-step policy and reference
    errors and losses agree to float rounding (the VAE runs per item when caching, per batch in training)."""
    from diffalign.config import load_config
    from diffalign.training.cache import build_cache

    # adam_eps 1e-4: with the default 1e-8, Adam's lr * g / (|g| + eps) turns rounding in a near-zero
    # gradient entry into a lr-sized weight change (CI measured 4e-4 on one of 256 SDXL entries)
    common = dict(model={"pretrained": f"tiny:{family}"}, train={"max_steps": 3, "batch_size": 4},
                  optim={"lr": 1e-3, "adam_eps": 1e-4}, data={"caption_dropout": 0.5, "random_flip": True})
    plain = run(tiny_config(tmp_path / "plain", **common))
    cfg = tiny_config(tmp_path / "cached", cache={"enabled": True, "dtype": "fp32"}, **common)
    build_cache(load_config(cfg), device="cpu")
    cached = run(cfg)
    assert cached.dataset.__class__.__name__ == "CachedPreferenceDataset"
    for a, b in zip(_logged(plain), _logged(cached), strict=True):
        for key in ("err_w", "err_l", "ref_err_w", "ref_err_l"):  # the loss scales error gaps by beta/2
            assert b[key] == pytest.approx(a[key], rel=2e-5), (a["step"], key)
    assert_states_close(trainable_state(plain), trainable_state(cached), atol=1e-4, rtol=0)


def test_cache_with_wrong_flips_would_be_caught(tmp_path, monkeypatch):
    """The equality above can fail: serve every item unflipped and the logged errors move."""
    from diffalign.config import load_config
    from diffalign.training import cache as cache_mod
    from diffalign.training.cache import build_cache

    common = dict(train={"max_steps": 2, "batch_size": 4}, data={"random_flip": True})
    plain = run(tiny_config(tmp_path / "plain", **common))
    cfg = tiny_config(tmp_path / "cached", cache={"enabled": True, "dtype": "fp32"}, **common)
    build_cache(load_config(cfg), device="cpu")
    real = cache_mod.item_draws
    monkeypatch.setattr(cache_mod, "item_draws", lambda *a: (real(*a)[0], False, real(*a)[2]))
    cached = run(cfg)
    diffs = [abs(a["err_w"] - b["err_w"]) / a["err_w"] for a, b in zip(_logged(plain), _logged(cached))]
    assert max(diffs) > 2e-5


def test_a_cache_from_another_setup_is_refused(tmp_path):
    from diffalign.config import load_config
    from diffalign.training.cache import CacheMismatchError, build_cache

    cfg = tiny_config(tmp_path, cache={"enabled": True})
    build_cache(load_config(cfg), device="cpu")
    other = dict(cfg, data={**cfg["data"], "resolution": 16})
    with pytest.raises(CacheMismatchError, match="resolution: cache has 32, config has 16"):
        run(other)
    other_model = dict(cfg, model={"pretrained": "tiny:sdxl"})
    with pytest.raises(CacheMismatchError, match="model"):
        run(other_model)


def test_missing_cache_and_random_crop_are_clear_errors(tmp_path):
    from diffalign.config import load_config
    from diffalign.training.cache import build_cache

    with pytest.raises(FileNotFoundError, match="diffalign cache"):
        run(tiny_config(tmp_path / "a", cache={"enabled": True}))
    with pytest.raises(ValueError, match="random_crop"):
        build_cache(load_config(tiny_config(tmp_path / "b", data={"random_crop": True})), device="cpu")


_BF16_CHECK = """
import json, sys, torch
from diffalign.config import load_config
from diffalign.training.cache import build_cache
from diffalign.training.trainer import Trainer
cfg = load_config(json.loads(sys.argv[1]))
build_cache(cfg, device="cpu")
trainer = Trainer(cfg)
trainer.train()
item = trainer.dataset[0]
fresh = trainer.backbone.encode_text(item["captions"])["prompt_embeds"]
assert fresh.dtype == torch.bfloat16, fresh.dtype
torch.testing.assert_close(item["cond"]["prompt_embeds"].to(fresh.dtype), fresh, atol=1e-2, rtol=1e-2)
print("OK")
"""


def test_cache_under_mixed_precision_matches_training_placement(tmp_path):
    """The cache encodes with the text encoders at training precision (bf16 here), so it is accepted and
    its conditioning equals what training from pixels would compute. (Its own process: accelerate fixes
    one mixed precision per process.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tiny_config(tmp_path, train={"mixed_precision": "bf16", "max_steps": 1}, cache={"enabled": True})
    proc = subprocess.run([sys.executable, "-c", _BF16_CHECK, json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_a_cache_built_by_two_processes_holds_what_one_process_builds(tmp_path):
    """`torchrun --nproc_per_node 2 -m diffalign cache`: each process encodes its share of the items into its
    own shards, process 0 joins the partial indexes; every item and caption reads back as from a one-process
    build (the VAE runs per item; captions are encoded in other batches, so to float rounding)."""
    import os
    import subprocess
    import sys

    import torch
    import yaml

    from diffalign.config import load_config
    from diffalign.training.cache import build_cache, verify_cache

    root = Path(__file__).resolve().parents[1]
    common = dict(model={"pretrained": "tiny:sdxl"}, data={"random_flip": True, "caption_dropout": 0.3})
    one = tiny_config(tmp_path / "one", cache={"enabled": True, "dtype": "fp32", "dir": str(tmp_path / "c1")}, **common)
    two = tiny_config(tmp_path / "two", cache={"enabled": True, "dtype": "fp32", "dir": str(tmp_path / "c2")}, **common)
    build_cache(load_config(one), device="cpu")
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "diffalign", "cache", str(path)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cache written to") == 1  # said once, by process 0
    a, b = verify_cache(tmp_path / "c1"), verify_cache(tmp_path / "c2")
    assert a["fingerprint"] == b["fingerprint"] and a["items"].keys() == b["items"].keys() and a["skipped"] == b["skipped"]
    assert a["captions"].keys() == b["captions"].keys()
    shards = {Path(s).name.split("-")[1] for s in b["items"].values()}
    assert shards == {"r000", "r001"}  # both processes wrote shards
    assert not list((tmp_path / "c2").glob("index.part-*"))
    from safetensors import safe_open

    def tensors(cache: Path, index: dict) -> dict:
        out = {}
        for shard in sorted(set(index["items"].values()) | set(index["captions"].values())):
            with safe_open(str(cache / shard), framework="pt") as f:
                out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return out

    ta, tb = tensors(tmp_path / "c1", a), tensors(tmp_path / "c2", b)
    assert ta.keys() == tb.keys() and any(k.startswith("i.") for k in ta) and any(k.startswith("c.") for k in ta)
    for k, v in ta.items():
        torch.testing.assert_close(tb[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
