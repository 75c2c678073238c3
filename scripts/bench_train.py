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

`--against diffusers` (SDXL configs): the baseline is the step of diffusers' research script
examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py, re-run on the same model and batch (its
VAE encode in chunks with a posterior sample, its two-encoder prompt encoding, its reference pass with the
adapters disabled, its loss, clipping and AdamW), against diffalign plain / + cache / + precomputed reference
/ + kernels / + compile; the precompute pass is timed and counted, and a sweep table shows what reusing it saves.

    python scripts/bench_train.py --against diffusers --config configs/bench_sdxl_tiny.yaml --steps 4 --rounds 3

Each variant runs in its own process (clean peak memory), `--rounds` times in alternating order. Prints a
markdown table; ratios are against the baseline. Steps are optimizer steps of the config's batch x
accumulation, timed after warm-up steps; s/step is the min and the median over rounds.
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
#: --against diffusers: each variant's overrides, every one adding to the one before
AGAINST = {
    "diffusers": None,
    "diffalign": [],
    "+ cache": ["cache.enabled=true"],
    "+ precomputed reference": ["train.reference=precomputed"],
    "+ kernels": ['train.kernels="on"'],  # quoted: YAML reads a bare on as true
    "+ compile": ["train.compile=true"],
}
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


def _timed(step, warmup: int, steps: int, device) -> dict:
    """Seconds per call of `step` after `warmup` untimed calls, and the process's peak memory."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return {"s_per_step": (time.perf_counter() - t0) / steps, "peak_gib": _peak_gib(device), "device": str(device)}


def run_trainer(cfg, warmup: int, steps: int) -> dict:
    from diffalign.training.trainer import Trainer

    trainer = Trainer(cfg)
    batches = iter(trainer._loader())
    return _timed(lambda: trainer._optimizer_step(batches), warmup, steps, trainer.acc.device) | {"speed": trainer.speed}


def run_diffusers(cfg, warmup: int, steps: int, vae_encode_batch_size: int = 8) -> dict:
    """The step of diffusers' train_diffusion_dpo_sdxl.py (LoRA on to_q/k/v/out.0, gaussian init, alpha = rank;
    UNet and text encoders in the weight dtype, VAE in fp32; adapters fp32 under fp16), on the backbone's
    modules and diffalign's data loader (pixels, captions, original sizes, crops)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from torch.utils.data import DataLoader

    from diffalign.backbones import load_backbone
    from diffalign.config import weight_dtype
    from diffalign.data import build_preference_dataset, collate_preference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weight_dtype(cfg.train.mixed_precision)
    bb = load_backbone(cfg.model.pretrained)
    if bb.family != "sdxl":
        sys.exit(f"--against diffusers re-runs the SDXL DPO script: give an SDXL config, not {bb.family}")
    unet, vae, sched = bb.denoiser.requires_grad_(False), bb.vae.requires_grad_(False), bb.noise_scheduler
    encoders = [bb.text_encoder.requires_grad_(False), bb.text_encoder_2.requires_grad_(False)]
    tokenizers = [bb.tokenizer, bb.tokenizer_2]
    unet.to(device, dtype)
    for te in encoders:
        te.to(device, dtype)
    vae.to(device, torch.float32)
    unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if cfg.train.mixed_precision == "fp16":
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.to(torch.float32)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.adam_betas, weight_decay=o.weight_decay, eps=o.adam_eps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # the script's default: constant
    loader = DataLoader(build_preference_dataset(cfg.data, seed=0), batch_size=cfg.train.batch_size, shuffle=True,
                        collate_fn=collate_preference, drop_last=True)
    beta = cfg.objective.params().get("beta", 5000.0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    res = cfg.data.resolution

    def batches():
        while True:
            yield from loader

    it = batches()

    def encode_prompt(captions: list[str]):
        embeds, pooled = [], None
        for tok, te in zip(tokenizers, encoders):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = te(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]  # the last encoder's projected pooled output
            embeds.append(out[-1][-2])  # penultimate hidden state
        return torch.cat(embeds, dim=-1), pooled

    def step():
        for _ in range(cfg.train.grad_accum):
            b = next(it)
            while b is None:
                b = next(it)
            pix = b["pixel_values"][:, :2].transpose(0, 1).flatten(0, 1).to(device, vae.dtype)  # winners, losers
            with torch.no_grad():
                latents = torch.cat([vae.encode(pix[i : i + vae_encode_batch_size]).latent_dist.sample()
                                     for i in range(0, len(pix), vae_encode_batch_size)]) * vae.config.scaling_factor
            latents = latents.to(dtype)
            noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
            bsz = latents.shape[0] // 2
            t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=device).repeat(2)
            noisy = sched.add_noise(latents, noise, t)
            time_ids = torch.tensor([[*map(int, s), *map(int, c), res, res] for s, c in
                                     zip(b["original_size"][:, 0], b["crop_top_left"][:, 0])],
                                    device=device, dtype=dtype).repeat(2, 1)
            with torch.no_grad():  # the script's encode_prompt is a no_grad function
                embeds, pooled = encode_prompt([item[0] for item in b["captions"]])
            embeds, pooled = embeds.repeat(2, 1, 1), pooled.repeat(2, 1)
            added = {"time_ids": time_ids, "text_embeds": pooled}
            with autocast:  # accelerate autocasts the prepared UNet's forward only
                pred = unet(noisy, t, embeds, added_cond_kwargs=added).sample
            losses = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
            model_diff = losses.chunk(2)[0] - losses.chunk(2)[1]
            unet.disable_adapters()
            with torch.no_grad():
                with autocast:
                    ref = unet(noisy, t, embeds, added_cond_kwargs=added).sample
                ref_losses = F.mse_loss(ref.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
                ref_diff = ref_losses.chunk(2)[0] - ref_losses.chunk(2)[1]
            unet.enable_adapters()
            loss = -F.logsigmoid(-0.5 * beta * (model_diff - ref_diff)).mean()
            (loss / cfg.train.grad_accum).backward()  # accelerate's backward divides by the accumulation
        torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm or 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()

    unet.train()
    return _timed(step, warmup, steps, device) | {"speed": "the diffusers SDXL DPO script's step"}


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

    return _timed(step, warmup, steps, device)


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffalign.config import load_config

    overrides = list(args.overrides) + [f"output_dir={args.workdir}/{_slug(args.variant)}",
                                        "logging.tensorboard=false", "validation.every=0",
                                        f"checkpoint.every={10**9}", f"cache.dir={args.workdir}/cache"]
    overrides += _variant_overrides(args.variant) + (_run_length(args) if args.against else [])
    if args.variant == "diffalign+cache":
        overrides.append("cache.enabled=true")
    cfg = load_config(args.config, overrides)
    if args.variant == "plain":
        result = run_plain(cfg, args.warmup, args.steps)
    elif args.variant == "diffusers":
        result = run_diffusers(cfg, args.warmup, args.steps)
    else:
        result = run_trainer(cfg, args.warmup, args.steps)
    result["items_per_step"] = cfg.train.batch_size * cfg.train.grad_accum
    print("RESULT " + json.dumps(result), flush=True)


def _slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant)


def _variant_overrides(variant: str) -> list[str]:
    """--against diffusers: a variant's overrides are its own and those of every variant above it."""
    if variant not in AGAINST or AGAINST[variant] is None:
        return []
    names = [n for n in AGAINST if AGAINST[n] is not None]
    return [o for n in names[: names.index(variant) + 1] for o in AGAINST[n]]


def _run_length(args) -> list[str]:
    """Every process runs (and the precomputed reference covers) warm-up + timed steps."""
    return [f"train.max_steps={args.warmup + args.steps}"]


def _child(args, variant: str, workdir: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--variant", variant, "--workdir", workdir, *(["--against", args.against] if args.against else []),
           *args.overrides]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {args.child_timeout} s (--child-timeout)"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(line[len("RESULT "):])


def against(args, workdir: str, env: dict) -> None:
    """--against diffusers: alternating rounds of every variant, the precompute pass timed, and a sweep table."""
    import statistics

    variants = [v for v in args.variants.split(",") if v] if args.variants != ",".join(VARIANTS) else list(AGAINST)
    common = [f"cache.dir={workdir}/cache", *_run_length(args), *args.overrides]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffalign", "cache", args.config, "cache.enabled=true", *common],
                   check=True, env=env, cwd=ROOT, capture_output=True)  # fmt: skip
    cache_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffalign", "precompute", args.config, "cache.enabled=true",
                    "train.reference=precomputed", *common], check=True, env=env, cwd=ROOT, capture_output=True)  # fmt: skip
    pre_wall = time.perf_counter() - t0
    manifest = json.loads((Path(workdir) / "cache" / "reference" / "manifest.json").read_text())
    pre_s, setup_s = manifest["pass_seconds"], manifest["seconds"] - manifest["pass_seconds"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            print(f"round {r + 1}/{args.rounds}: {v}", file=sys.stderr, flush=True)
            runs[v].append(_child(args, v, workdir, env))
    n = args.warmup + args.steps
    rows = {}
    for v, results in runs.items():
        ok = [x for x in results if "error" not in x]
        if not ok:
            rows[v] = {"error": results[0]["error"]}
            continue
        times = [x["s_per_step"] for x in ok]
        rows[v] = {"min": min(times), "median": statistics.median(times), "peak": statistics.median(x["peak_gib"] for x in ok),
                   "speed": ok[0].get("speed", ""), "device": ok[0]["device"]}  # fmt: skip
    base = rows.get("diffusers", {})
    print(f"\nconfig: {args.config} {' '.join(args.overrides)}; device: {next((r['device'] for r in rows.values() if 'device' in r), '?')}; "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} alternating rounds; "
          f"threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")  # fmt: skip
    print(f"cache build (not in the timings): {cache_s:.1f} s wall including start-up; precompute pass: {pre_s:.2f} s "
          f"for {manifest['micro_batches']} micro-batches, counted below (plus {setup_s:.1f} s loading the model and "
          f"data in its process, {pre_wall:.1f} s wall with interpreter start-up, as the cache build's, not counted)")  # fmt: skip
    print("\n| variant | s/step min | s/step median | ratio (median) | peak memory (GiB) | ratio | notes |")
    print("|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        if "error" in r:
            print(f"| {v} | - | - | - | - | - | unavailable here: {r['error']} |")
            continue
        note = r["speed"]
        med = r["median"]
        if v in ("+ precomputed reference", "+ kernels", "+ compile"):
            med_single = med + pre_s / n
            note += f"; with the precompute pass counted in this {n}-step run: {med_single:.4f} s/step"
        ratio = f"{med / base['median']:.2f}x" if "median" in base else "-"
        mem = f"{r['peak'] / base['peak']:.2f}x" if "peak" in base else "-"
        print(f"| {v} | {r['min']:.4f} | {med:.4f} | {ratio} | {r['peak']:.3f} | {mem} | {note} |")
    if "+ cache" in rows and "+ precomputed reference" in rows and "median" in rows["+ precomputed reference"]:
        live, pre = rows["+ cache"]["median"], rows["+ precomputed reference"]["median"]
        print(f"\nA sweep of several {n}-step runs over the same data and seed (beta / lr sweeps): training time "
              "with the live reference vs one precompute pass shared by every run")
        print("\n| runs | + cache (s) | + precomputed, pass counted once (s) | saved |")
        print("|---|---|---|---|")
        for k in (1, 2, 4, 8):
            a, b = k * n * live, pre_s + k * n * pre
            print(f"| {k} | {a:.2f} | {b:.2f} | {(a - b) / a:+.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_dpo.yaml"))
    p.add_argument("--model", choices=tuple(SCALED_DOWN), help="run configs/bench_<model>_random.yaml (full size on a "
                   "GPU, scaled down on a CPU); overrides --config")  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--against", choices=["diffusers"], help="baseline: the diffusers SDXL DPO script's step")
    p.add_argument("--rounds", type=int, default=3, help="--against: alternating rounds of every variant")
    p.add_argument("--child-timeout", type=int, default=1200, help="--against: seconds one variant's process may take")
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
    if args.against:
        return against(args, workdir, env)
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
