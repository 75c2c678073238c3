#!/usr/bin/env python
"""Microbenchmark of the fused kernels (diffalign/kernels) against eager PyTorch and torch.compile of the
same plain-torch reference, forward + backward, in one run.

    python scripts/bench_kernels.py                  # on a GPU: SDXL shapes, bf16
    python scripts/bench_kernels.py --autocast       # eager/compile as they run inside a bf16 autocast UNet
    python scripts/bench_kernels.py --no-compile     # skip torch.compile (on a CPU it compiles for minutes)

Kernels and shapes: GroupNorm(32 groups)+SiLU on the SDXL UNet's activations at 1024 px ([2, 320, 128,
128], [2, 640, 64, 64], [2, 1280, 32, 32]) and the per-sample energy on SDXL latents ([4, 4, 128, 128]:
two pairs; [16, 4, 128, 128]) with a bf16 prediction and an fp32 target. Each round runs every variant
once, in turn (alternating, so drifting clocks and neighbours hit all alike); a sample is `--inner` calls;
the table gives the median and the minimum over rounds, the ratio of eager's median to the variant's, and
the peak memory a call adds over its inputs (CUDA only).

Without a CUDA device and Triton the fused kernels cannot be timed (the Triton interpreter is a
correctness tool): the script then runs scaled-down shapes for eager and compile only, and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GN_SHAPES = [(2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32)]
ENERGY_SHAPES = [(4, 4, 128, 128), (16, 4, 128, 128)]
# on a CPU: channels / 5 and sides / 4 (32 groups still fit), latents / 4
CPU_GN_SHAPES = [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]
CPU_ENERGY_SHAPES = [(4, 4, 32, 32), (16, 4, 32, 32)]
GROUPS = 32


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _case_group_norm_silu(shape, dtype, device, gen):
    """(inputs, fn(variant_fn) -> one forward + backward) for GroupNorm+SiLU."""
    import torch

    x = torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(shape[1], device=device, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(shape[1], device=device, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device, generator=gen).to(dtype)

    def call(fn):
        fn(x, w, b, GROUPS, 1e-5).backward(dy)
        x.grad = w.grad = b.grad = None

    return call


def _case_energy(shape, dtype, device, gen):
    import torch

    pred = torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_()
    target = torch.randn(shape, device=device, generator=gen)  # fp32, as the noise-process target is
    g = torch.randn(shape[0], device=device, generator=gen)

    def call(fn):
        fn(pred, target).backward(g)
        pred.grad = None

    return call


def _peak_mib(call, fn, device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call(fn)
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench(call, variants: dict, device, rounds: int, inner: int, warmup: int) -> dict[str, dict]:
    for fn in variants.values():  # warm-up: compilation, autotuning, allocator
        for _ in range(warmup):
            call(fn)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                call(fn)
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: {"median": statistics.median(ts), "min": min(ts), "peak_mib": _peak_mib(call, variants[name], device)}
            for name, ts in times.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--autocast", action="store_true",
                   help="run eager and compile inside torch.autocast(dtype), as in mixed-precision training")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (on a busy small machine more threads measure contention)")
    p.add_argument("--shapes", choices=["auto", "sdxl", "small"], default="auto",
                   help="auto: SDXL shapes on a GPU, scaled down on a CPU")
    args = p.parse_args(argv)

    import torch

    from diffalign import kernels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    fused_ok = device.type == "cuda" and kernels.fallback_reason(device) is None
    small = args.shapes == "small" or (args.shapes == "auto" and device.type != "cuda")
    triton = kernels.runtime.load_triton()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); "
          f"torch {torch.__version__}; triton {triton.__version__ if triton else 'not installed'}; {args.dtype}"
          f"{' under autocast' if args.autocast else ''}; {args.rounds} alternating rounds of {args.inner} calls; "
          f"{args.threads} CPU thread(s)")  # fmt: skip
    if not fused_ok:
        why = kernels.fallback_reason(device) or "no CUDA device"
        print(f"NO FUSED TIMINGS: {why}. The fused kernels run only on a CUDA device with Triton (the Triton "
              "interpreter is for correctness tests); below: the plain-torch reference path"
              + (", scaled-down shapes" if small else "") + ".")  # fmt: skip

    def variants(reference, fused):
        def autocast(fn):
            if not args.autocast:
                return fn
            return lambda *a: torch.autocast(device.type, dtype=dtype)(fn)(*a)

        out = {"eager": autocast(reference)}
        if not args.no_compile:
            out["compile"] = autocast(torch.compile(reference))
        if fused_ok:
            out["fused"] = fused
        return out

    gen = torch.Generator(device=device).manual_seed(0)
    cases = [("GroupNorm+SiLU", s, _case_group_norm_silu, kernels.group_norm_silu_reference, kernels.group_norm_silu)
             for s in (CPU_GN_SHAPES if small else GN_SHAPES)]
    cases += [("energy", s, _case_energy, kernels.per_sample_mse_reference, kernels.per_sample_mse)
              for s in (CPU_ENERGY_SHAPES if small else ENERGY_SHAPES)]  # fmt: skip
    print("\n| kernel (fwd+bwd) | shape | variant | median ms | min ms | speed vs eager | peak MiB over inputs |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, case, reference, fused in cases:
        call = case(shape, dtype, device, gen)
        results = bench(call, variants(reference, fused), device, args.rounds, args.inner, args.warmup)
        eager = results["eager"]["median"]
        for variant, r in results.items():
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            print(f"| {name} | {list(shape)} | {variant} | {r['median'] * 1e3:.3f} | {r['min'] * 1e3:.3f} | "
                  f"{eager / r['median']:.2f}x | {peak} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
