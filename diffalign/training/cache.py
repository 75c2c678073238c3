"""The latent and text-conditioning cache (`diffalign cache CONFIG`).

Training then reads VAE posteriors and text conditioning from safetensors shards instead of running the
VAE and the text encoders every step. What is stored keeps cached training equal to uncached training:
- per item and orientation (both, when data.random_flip is on): the VAE posterior's mean and std of every
  candidate, so the trainer draws the same posterior sample it would draw from pixels; plus the SDXL
  size/crop ids;
- per unique caption (and for ""): the text conditioning, so caption dropout still works. It is stored in
  the training precision the text encoders ran at (no second rounding; T5-XXL states of SD3 / FLUX are
  333 / 512 tokens x 4096 per caption), and a run that reads the cache never builds the lazily held T5
  (diffalign/backbones/t5.py), whose fingerprint comes from its files.
The flip and dropout of each step are drawn by `item_draws`, the same function the uncached path uses.
A cache made with another model, other preprocessing or other data is refused, naming what differs.
Random crops cannot be precomputed: data.random_crop with the cache is an error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffalign.atomic import atomic_path, remove_temps, write_atomic
from diffalign.configio import ConfigError
from diffalign.data.dataset import candidate_flips, item_draws
from diffalign.errors import MissingFile, UserError, check_safetensors, cli_entry

INDEX = "index.json"
#: the partial index each process of a parallel build writes before process 0 joins them
PART_GLOB = "index.part-*.json"
FORMAT_VERSION = 2  # 2: text conditioning in the training precision (text_dtype)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CacheMismatchError(UserError, ValueError):
    pass


def cache_dir_for(cfg) -> Path:
    return Path(cfg.cache.dir) if cfg.cache.dir else Path(cfg.output_dir) / "cache"


def _caption_id(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:24]


def fingerprint(cfg, backbone, n_items: int) -> dict:
    d = cfg.data
    data = d.model_dump(mode="json")
    for k in ("max_items", "max_skip_fraction"):  # a cache of more items serves a run that uses fewer
        data.pop(k, None)
    return {"version": FORMAT_VERSION, "model": backbone.fingerprint(), "data": data, "seed": cfg.train.seed,
            "dtype": cfg.cache.dtype, "text_dtype": cfg.train.mixed_precision}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: cache has {va!r}, config has {vb!r}")
    return out


def build_cache(cfg, backbone=None, device: str | None = None, shard_items: int = 256) -> Path:
    """Encode every item of cfg.data (both flips when random_flip) and every caption; write shards + index.

    Launched in N processes (`accelerate launch` / `torchrun ... -m diffalign cache`), process r encodes
    items r, r + N, r + 2N, ... into its own shards (`shard-r<r>-<n>`), and process 0 joins their partial
    indexes into the one index training reads; the cache holds the same tensors as a one-process build."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from diffalign.backbones.registry import backbone_from_config
    from diffalign.config import weight_dtype
    from diffalign.data import build_preference_dataset

    if cfg.data.random_crop:
        raise ConfigError("data.random_crop cannot be cached (the crop changes every epoch); set "
                          "data.random_crop=false or cache.enabled=false")
    from diffalign.training.preflight import check_skip_share, probe_data

    ds = build_preference_dataset(cfg.data, seed=cfg.train.seed)
    probe_data(ds, cfg.data.max_skip_fraction)  # before the model loads
    # cpu=True without an accelerator lets torchrun-launched processes form a gloo group (as the trainer's)
    state = PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    rank, world = state.process_index, state.num_processes
    backbone = backbone or backbone_from_config(cfg.model)
    device = device or str(state.device)
    text_dtype = weight_dtype(cfg.train.mixed_precision)
    backbone.place(device, text_dtype, cfg.model.vae_fp32)
    dtype = _DTYPES[cfg.cache.dtype]
    out = cache_dir_for(cfg)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_temps(out)  # shards of a killed build
        for stale in out.glob(PART_GLOB):
            stale.unlink()
    state.wait_for_everyone()
    prefix = "shard" if world == 1 else f"shard-r{rank:03d}"
    flips = [False, True] if cfg.data.random_flip else [False]
    items: dict[str, str] = {}
    captions: dict[str, str] = {}
    cond_keys: list[str] = []
    pending_items: dict[str, torch.Tensor] = {}
    pending_caps: dict[str, str] = {}
    shard = 0

    def flush() -> None:
        nonlocal shard, pending_items, pending_caps
        if not pending_items and not pending_caps:
            return
        name = f"{prefix}-{shard:05d}.safetensors"
        tensors = dict(pending_items)
        if pending_caps:
            enc = backbone.encode_text(list(pending_caps.values()))
            cond_keys[:] = sorted(enc)
            for j, cid in enumerate(pending_caps):
                for k, v in enc.items():
                    tensors[f"c.{cid}.{k}"] = v[j].to(text_dtype).cpu().contiguous()
                captions[cid] = name
        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp))
        shard += 1
        pending_items, pending_caps = {}, {}

    pending_caps[_caption_id("")] = ""
    n_in_shard = 0
    mine = range(rank, len(ds), world)
    for i in tqdm(mine, desc="cache", disable=not state.is_main_process):
        for flip in flips:
            ds.force_flip = flip
            item = ds[i]
            if item is None:
                break
            mean, std = backbone.latent_posterior(item["pixel_values"].to(device))
            f = int(flip)
            pending_items[f"i.{i}.{f}.mean"] = mean.to(dtype).cpu().contiguous()
            pending_items[f"i.{i}.{f}.std"] = std.to(dtype).cpu().contiguous()
            pending_items[f"i.{i}.{f}.original_size"] = item["original_size"]
            pending_items[f"i.{i}.{f}.crop_top_left"] = item["crop_top_left"]
        else:
            items[str(i)] = f"{prefix}-{shard:05d}.safetensors"
            for c in item["captions"]:
                cid = _caption_id(c)
                if cid not in captions and cid not in pending_caps:
                    pending_caps[cid] = c
            n_in_shard += 1
        if n_in_shard >= shard_items:
            flush()
            n_in_shard = 0
    ds.force_flip = None
    flush()
    if world > 1:  # every process reads every part, so all of them agree on the skip check below
        write_atomic(out / PART_GLOB.replace("*", f"{rank:03d}"), json.dumps({"items": items, "captions": captions}))
        state.wait_for_everyone()
        for part in sorted(out.glob(PART_GLOB)):
            joined = json.loads(part.read_text(encoding="utf-8"))
            items |= joined["items"]
            captions = joined["captions"] | captions
    check_skip_share(ds, len(ds) - len(items), len(ds), cfg.data.max_skip_fraction, "of the data")  # no index then
    if state.is_main_process:
        items = {str(i): items[str(i)] for i in range(len(ds)) if str(i) in items}
        index = {"fingerprint": fingerprint(cfg, backbone, len(ds)), "n_items": len(ds), "items": items,
                 "captions": captions, "cond_keys": cond_keys, "skipped": len(ds) - len(items)}
        write_atomic(out / INDEX, json.dumps(index))
    state.wait_for_everyone()
    if state.is_main_process:
        for part in out.glob(PART_GLOB):
            part.unlink()
    return out


def verify_cache(path: str | Path) -> dict:
    """The cache's index, after checking that every shard it names is a complete safetensors file (a
    truncated or missing shard is named); read before any model loads."""
    path = Path(path)
    fix = "rebuild it with `diffalign cache <config>` (or set cache.enabled=false)"
    if not (path / INDEX).is_file():
        raise MissingFile(f"no cache at {path}: run `diffalign cache <config>` first (or set cache.enabled=false)")
    try:
        index = json.loads((path / INDEX).read_text())
        shards = sorted(set(index["items"].values()) | set(index["captions"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path / INDEX} is unreadable ({err}); {fix}") from None
    for shard in shards:
        check_safetensors(path / shard, fix)
    return index


class CachedPreferenceDataset(torch.utils.data.Dataset):
    """Items from a cache directory, shaped like PreferenceDataset items plus latent/cond tensors."""

    def __init__(self, path: str | Path, backbone, cfg, data=None):
        from diffalign.data import build_preference_dataset

        self.path = Path(path)
        self.index = verify_cache(self.path)
        self.cfg = cfg
        # the light part of the dataset (captions order, phi, keys) comes from the real loader
        self.data = data if data is not None else build_preference_dataset(cfg.data, seed=cfg.train.seed)
        want = fingerprint(cfg, backbone, len(self.data))
        diffs = _diff(self.index["fingerprint"], want)
        if diffs:
            raise CacheMismatchError(f"the cache at {self.path} was made differently; rebuild it with "
                                     "`diffalign cache`:\n  " + "\n  ".join(diffs[:10]))
        self.seed, self.epoch = cfg.train.seed, 0
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def describe(self) -> str:
        return f"{self.data.describe()}; cached at {self.path} ({len(self.index['items'])} items)"

    def _get(self, shard: str, key: str) -> torch.Tensor:
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return h.get_tensor(key)

    def _cond(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = [_caption_id(c) for c in captions]
        return {k: torch.stack([self._get(self.index["captions"][cid], f"c.{cid}.{k}") for cid in ids])
                for k in self.index["cond_keys"]}

    def __getitem__(self, index: int):
        shard = self.index["items"].get(str(index))
        if shard is None:
            return None  # unusable when the cache was built (counted then)
        rng, flip, drop = item_draws(self.data.cfg, self.seed, self.epoch, index)
        captions = self.data.captions(index)
        flips = [int(f) for f in candidate_flips(self.data.cfg, rng, flip, len(captions))]
        captions = [""] * len(captions) if drop else captions

        def field(name: str) -> torch.Tensor:  # candidate j in its own orientation
            if len(set(flips)) == 1:
                return self._get(shard, f"i.{index}.{flips[0]}.{name}")
            return torch.stack([self._get(shard, f"i.{index}.{f}.{name}")[j] for j, f in enumerate(flips)])

        return {
            "latent_mean": field("mean"),
            "latent_std": field("std"),
            "original_size": field("original_size"),
            "crop_top_left": field("crop_top_left"),
            "cond": self._cond(captions),
            "captions": captions,
            "phi": torch.from_numpy(self.data.phi[index].astype("float32")),
            "key": self.data.key(index),
        }

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    @staticmethod
    def collate(items):
        items = [x for x in items if x is not None]
        if not items:
            return None
        out = {k: torch.stack([x[k] for x in items]) for k in ("latent_mean", "latent_std", "original_size",
                                                                "crop_top_left", "phi")}
        out["cond"] = {k: torch.stack([x["cond"][k] for x in items]) for k in items[0]["cond"]}
        out["captions"] = [x["captions"] for x in items]
        out["keys"] = [x["key"] for x in items]
        return out


@cli_entry("diffalign cache")
def main(argv: list[str] | None = None) -> int:
    import argparse

    from diffalign.config import load_config
    from diffalign.configio import parse_cli

    p = argparse.ArgumentParser(prog="diffalign cache", description="Precompute VAE latents and text conditioning.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, anywhere on the line: cache.dir=/data/cache")
    p.add_argument("--device", default=None)
    args = parse_cli(p, argv)
    cfg = load_config(args.config, args.overrides)
    out = build_cache(cfg, device=args.device)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"cache written to {out}; train with cache.enabled=true cache.dir={out}")
    return 0
