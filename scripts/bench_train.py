#!/usr/bin/env python
"""Training throughput and peak memory: diffalign with and without the latent/text cache, beside a plain
loop that runs the VAE and the text encoders every step (the diffusers DPO scripts' way), in one run.

    python scripts/bench_train.py                                   # tiny SD, CPU, configs/tiny_dpo.yaml
    python scripts/bench_train.py --config configs/bench_sdxl_random.yaml --steps 10   # full-size SDXL, GPU
    python scripts/bench_train.py --model sd3 --steps 10    # SD3-Medium architecture (GPU) / scaled down (CPU)
    python scripts/bench_train.py --model flux --steps 10   # FLUX.1-dev architecture (GPU) / scaled down (CPU)

`--model sd3|flux|sdxl` runs configs/bench_<model>_random.yaml: the full-size architecture with random weights
when a GPU is available; on a CPU its scaled-down layout (small:<model>: the same block types, fewer and
narrower layers, the T5 stand-in held lazily like a real one) at 128 px in fp32, which the table then says.

Each variant runs in its own process (clean peak memory). Prints a markdown table; ratios are against the
plain loop. Steps are optimizer steps of the config's batch x accumulation, timed after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("plain", "diffalign", "diffalign+cache")
#: overrides that turn a bench_<model>_random.yaml recipe into its scaled-down CPU version
_CPU = ["data.builtin_rows=16", "train.mixed_precision='no'", "train.gradient_checkpointing=false", "cache.dtype=fp32"]
SCALED_DOWN = {
    "sdxl": ["model.pretrained=tiny:sdxl", "data.resolution=32", *_CPU],
    "sd3": ["model.pretrained=small:sd3", "data.resolution=128", *_CPU],
    "flux": ["model.pretrained=small:flux", "data.resolution=128", *_CPU],
}


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def run_trainer(cfg, warmup: int, steps: int) -> dict:
    from diffalign.training.trainer import Trainer

    trainer = Trainer(cfg)
    batches = iter(trainer._loader())
    for _ in range(warmup):
        trainer._optimizer_step(batches)
    device = trainer.acc.device
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer._optimizer_step(batches)
    _sync(device)
    return {"s_per_step": (time.perf_counter() - t0) / steps, "peak_gib": _peak_gib(device), "device": str(device)}


def run_plain(cfg, warmup: int, steps: int) -> dict:
    """What a hand-written Diffusion-DPO LoRA step does: VAE + text encoders every step, policy forward and
    backward, reference forward with the adapters switched off, AdamW."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from torch.utils.data import DataLoader

    from diffalign.backbones.registry import backbone_from_config
    from diffalign.config import weight_dtype
    from diffalign.data import build_preference_dataset, collate_preference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weight_dtype(cfg.train.mixed_precision)
    bb = backbone_from_config(cfg.model)
    unet = bb.denoiser.requires_grad_(False).to(device, dtype)
    bb.place(device, dtype)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.rank, init_lora_weights="gaussian",
                                target_modules=cfg.lora.target_modules or bb.lora_target_modules))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    loader = DataLoader(build_preference_dataset(cfg.data, seed=0), batch_size=cfg.train.batch_size, shuffle=True,
                        collate_fn=collate_preference, drop_last=True)
    beta = cfg.objective.params().get("beta", 5000.0)

    def batches():
        while True:
            yield from loader

    it = batches()

    def step():
        for _ in range(cfg.train.grad_accum):
            b = next(it)
            while b is None:  # every item of the batch unusable (counted by the data layer)
                b = next(it)
            B = b["pixel_values"].shape[0]
            with torch.no_grad():
                pix = b["pixel_values"].flatten(0, 1).to(device)
                lat = bb.encode_images(pix).to(dtype)
                cond = bb.encode_text([c for item in b["captions"] for c in item])
                cond |= {k: v.to(device) for k, v in bb.micro_conditioning(
                    b["original_size"].flatten(0, 1), b["crop_top_left"].flatten(0, 1), cfg.data.resolution).items()}
            noise = torch.randn_like(lat[::2]).repeat_interleave(2, 0)
            t = bb.process.sample_t(B).to(device).repeat_interleave(2)  # DDPM: uniform integers; flow: the density
            noisy = bb.process.add_noise(lat, noise, t)
            target = bb.process.target(lat, noise, t).float()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred = bb.predict(unet, noisy, t, cond)
                with torch.no_grad():
                    unet.disable_adapters()
                    ref = bb.predict(unet, noisy, t, cond)
                    unet.enable_adapters()
            err = F.mse_loss(pred.float(), target, reduction="none").mean((1, 2, 3)).view(B, 2)
            rerr = F.mse_loss(ref.float(), target, reduction="none").mean((1, 2, 3)).view(B, 2)
            inside = -0.5 * beta * ((err[:, 0] - err[:, 1]) - (rerr[:, 0] - rerr[:, 1]))
            (-F.logsigmoid(inside).mean() / cfg.train.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return {"s_per_step": (time.perf_counter() - t0) / steps, "peak_gib": _peak_gib(device), "device": str(device)}


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffalign.config import load_config

    overrides = list(args.overrides) + [f"output_dir={args.workdir}/{args.variant.replace('+', '_')}",
                                        "logging.tensorboard=false", "validation.every=0",
                                        f"checkpoint.every={10**9}", f"cache.dir={args.workdir}/cache"]
    if args.variant == "diffalign+cache":
        overrides.append("cache.enabled=true")
    cfg = load_config(args.config, overrides)
    if args.variant == "plain":
        result = run_plain(cfg, args.warmup, args.steps)
    else:
        result = run_trainer(cfg, args.warmup, args.steps)
    result["items_per_step"] = cfg.train.batch_size * cfg.train.grad_accum
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_dpo.yaml"))
    p.add_argument("--model", choices=tuple(SCALED_DOWN), help="run configs/bench_<model>_random.yaml (full size on a "
                   "GPU, scaled down on a CPU); overrides --config")  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()
    if args.variant:
        return child(args)
    if args.model:
        args.config = str(ROOT / "configs" / f"bench_{args.model}_random.yaml")
        if not gpu_available():
            args.overrides = [*SCALED_DOWN[args.model], *args.overrides]

    workdir = tempfile.mkdtemp(prefix="diffalign-bench-")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    variants = args.variants.split(",")
    cache_s = None
    if "diffalign+cache" in variants:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffalign", "cache", args.config, f"cache.dir={workdir}/cache",
                        *args.overrides], check=True, env=env, cwd=ROOT)
        cache_s = time.perf_counter() - t0
    results = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--variant", v, "--workdir", workdir, *args.overrides]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"variant {v} failed:\n{proc.stderr[-4000:]}")
        results[v] = json.loads(line[len("RESULT "):])
    base = results.get("plain")
    print(f"\nconfig: {args.config} {' '.join(args.overrides)}; device: {next(iter(results.values()))['device']}; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    if cache_s is not None:
        print(f"building the cache (not in the timings): {cache_s:.1f} s including start-up")
    print("\n| variant | s/step | items/s | peak memory (GiB) | speed vs plain | memory vs plain |")
    print("|---|---|---|---|---|---|")
    for v, r in results.items():
        speed = f"{base['s_per_step'] / r['s_per_step']:.2f}x" if base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "-"
        print(f"| {v} | {r['s_per_step']:.4f} | {r['items_per_step'] / r['s_per_step']:.2f} | {r['peak_gib']:.2f} | "
              f"{speed} | {mem} |")


if __name__ == "__main__":
    main()
