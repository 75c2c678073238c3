"""`diffalign precompute CONFIG`: the reference energies of a run, computed ahead (`train.reference: precomputed`).

Which item a data-stream position holds, and its timestep, noise and VAE posterior sample, are functions of
(train.seed, the position, the global batch) only (diffalign/training/experience.py). So the energies the
frozen base model gives every position a run will read can be computed in one inference pass (no autograd,
`--batch` items per forward, rather than the training batch) before training; the run then computes only
the policy's energies and holds no reference module, which for full fine-tuning is a whole copy of the
denoiser less. A sweep over beta or the learning rate on the same data reuses one table.

The table lives beside the latent cache, `<cache dir>/reference/`: `energies.safetensors` (float32
[positions, K]) and `manifest.json` (the fingerprint of everything the energies depend on, the number of
micro-batches covered, the key of the item at each position). Training refuses a table made for another
seed, batch size, number of processes, data, model, cache, precision or noise mode, or one that covers
fewer micro-batches than the run takes, and checks each item's key as it reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffalign.atomic import atomic_path, write_atomic
from diffalign.configio import ConfigError
from diffalign.errors import cli_entry
from diffalign.training.distributed import make_accelerator
from diffalign.training.experience import OfflineSource, candidate_noise
from diffalign.training.reference import ENERGIES_FILE, MANIFEST_FILE, energies_dir, energies_fingerprint
from diffalign.training.trainer import (
    _EpochIndexed,
    batch_sampler,
    kernels_wanted,
    training_dataset,
)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Batch-major concatenation that keeps the images' memory format (the VAE's latents come channels-last,
    and a convolution's rounding depends on the layout it reads)."""
    if len(tensors) == 1:
        return tensors[0]
    if tensors[0].dim() == 5:  # [B, K, C, H, W]: joined as [B*K, C, H, W] images, which torch.cat keeps in format
        return torch.cat([t.flatten(0, 1) for t in tensors]).unflatten(0, (-1, tensors[0].shape[1]))
    return torch.cat(tensors)


def _concat(parts: list[dict]) -> dict:
    """One forward's inputs from several micro-batch slices (every tensor is batch-major)."""
    out = {k: _cat([p[k] for p in parts]) for k in ("x0", "noise", "t")}
    out["cond"] = {k: _cat([p["cond"][k] for p in parts]) for k in parts[0]["cond"]}
    return out


def build_reference_energies(cfg, processes: int = 1, batch: int = 16, extra_micro: int = 0) -> Path:
    """Compute and write the reference energies of every stream position the run of `cfg` on `processes`
    processes reads (train.max_steps x grad_accum micro-batches, plus `extra_micro` for skipped steps)."""
    from tqdm.auto import tqdm

    from diffalign.backbones import load_backbone
    from diffalign.config import weight_dtype
    from diffalign.data import build_preference_dataset, collate_preference
    from diffalign.objectives import get_objective
    from diffalign.training import preflight

    obj = get_objective(cfg.objective.name)
    if not obj.needs_reference:
        raise ConfigError(f"objective {obj.name!r} has no reference model: there is nothing to precompute")
    if cfg.experience_source() != "offline":
        raise ConfigError(f"{cfg.experience_source()} experience is sampled during training, so its reference "
                          "energies cannot be computed ahead; train with train.reference=auto")  # fmt: skip
    t0 = time.perf_counter()
    acc = make_accelerator(cfg)  # the training precision's autocast, on the device training would use
    device, dtype = acc.device, weight_dtype(cfg.train.mixed_precision)
    data = build_preference_dataset(cfg.data, seed=cfg.train.seed)
    if cfg.cache.enabled:
        from diffalign.training.cache import cache_dir_for, verify_cache

        verify_cache(cache_dir_for(cfg))
    else:
        preflight.probe_data(data, cfg.data.max_skip_fraction)
    mc = cfg.model
    bb = load_backbone(mc.pretrained, mc.family, mc.revision, mc.variant, mc.vae, mc.prediction_type)
    fingerprint = energies_fingerprint(cfg, bb, processes)
    bb.place(device, dtype, mc.vae_fp32)
    unet = bb.denoiser.requires_grad_(False).to(device)
    if cfg.lora is None:  # the frozen copy runs in eval mode; adapters-off runs in the policy's mode, as loaded
        unet.eval()
    if next(unet.parameters()).dtype != dtype:  # the dtype the frozen copy / the adapters-off policy run in
        unet.to(dtype)
    fused, _ = kernels_wanted(cfg.train, device)
    if fused:
        bb.apply_kernels()
    if cfg.train.channels_last:
        unet.to(memory_format=torch.channels_last)
    ds = training_dataset(cfg, bb, data)
    b, seed = cfg.train.batch_size, cfg.train.seed
    G = b * processes
    n_micro = cfg.train.max_steps * cfg.train.grad_accum + extra_micro
    source = OfflineSource(bb, seed, cfg.data.resolution, device, dtype, global_batch=G, local_batch=b, rank=0,
                           candidates=obj.candidates, per_candidate_noise=candidate_noise(obj.validate(cfg.objective.params())),
                           fused_energy=fused)  # fmt: skip
    collate = getattr(ds, "collate", collate_preference)
    loaders = [iter(DataLoader(_EpochIndexed(ds), batch_sampler=batch_sampler(cfg, ds, processes, r),
                               collate_fn=collate)) for r in range(processes)]  # fmt: skip
    table: torch.Tensor | None = None
    keys: list[str | None] = [None] * (n_micro * G)
    pending: list[dict] = []
    t_pass = time.perf_counter()

    def flush() -> None:
        nonlocal table
        if not pending:
            return
        with torch.no_grad(), acc.autocast():
            energies = source.energy_of(_concat(pending), unet).float().cpu()
        if table is None:
            table = torch.full((n_micro * G, energies.shape[1]), float("nan"))
        table[[p for part in pending for p in part["positions"]]] = energies
        pending.clear()

    for micro in tqdm(range(n_micro), desc="reference energies"):
        for rank, loader in enumerate(loaders):  # each process's slice, as that process would collate it
            item = next(loader)
            if item is None:  # every item of the slice unusable: the run computes no energy for it
                continue
            item = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in item.items()}
            source.rank = rank
            inputs = source.inputs(item, micro)
            for pos, key in zip(inputs["positions"], item["keys"], strict=True):
                keys[pos] = key
            pending.append(inputs)
            if sum(len(p["positions"]) for p in pending) >= batch:
                flush()
    flush()
    pass_s = time.perf_counter() - t_pass
    if table is None:
        raise ConfigError("no usable item in the micro-batches of this run: nothing to precompute")
    out = energies_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # the manifest is written last: a half-written table has none
    from safetensors.torch import save_file

    with atomic_path(out / ENERGIES_FILE) as tmp:
        save_file({"energies": table.contiguous()}, str(tmp))
    manifest = {"fingerprint": fingerprint, "micro_batches": n_micro, "global_batch": G, "keys": keys,
                "seconds": round(time.perf_counter() - t0, 2), "pass_seconds": round(pass_s, 2),
                "device": str(device)}  # fmt: skip
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest))
    return out


@cli_entry("diffalign precompute")
def main(argv: list[str] | None = None) -> int:
    import argparse

    from diffalign.config import load_config
    from diffalign.configio import parse_cli

    p = argparse.ArgumentParser(prog="diffalign precompute", description=__doc__.split("\n\n")[0],
                                epilog="Then train with train.reference=precomputed and the same config and overrides.")  # fmt: skip
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as the training run will have them")
    p.add_argument("--processes", type=int, default=1, help="how many processes the training run uses (default 1)")
    p.add_argument("--batch", type=int, default=16, help="items per forward pass (default 16); 1: one forward per training micro-batch slice, the "
                   "shapes training runs, so the energies equal the live reference's without batch-shape rounding")
    p.add_argument("--extra-micro-batches", type=int, default=0,
                   help="micro-batches beyond max_steps x grad_accum, for runs that skip non-finite steps")
    args = parse_cli(p, argv)
    if args.processes < 1 or args.batch < 1 or args.extra_micro_batches < 0:
        raise ConfigError("--processes and --batch must be at least 1, --extra-micro-batches at least 0")
    cfg = load_config(args.config, args.overrides)
    out = build_reference_energies(cfg, args.processes, args.batch, args.extra_micro_batches)
    print(f"reference energies written to {out}; train with train.reference=precomputed")
    return 0
