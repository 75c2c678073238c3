"""Throughput of the built-in scorers: batched vs one image at a time (how the reference tools score),
with the max |difference| between the two as a correctness check. Prints a markdown table.

    python scripts/bench_scorers.py                    # tiny random models, CPU
    python scripts/bench_scorers.py --real --device cuda --dtype fp16 --n 64 --batch-size 32
    python scripts/bench_scorers.py --scorers toy_correct --prompt "a red circle"   # a toy-world scorer

By default it runs the model-based scorers (those whose factory takes a dtype); the toy world's rewards
are numpy on the CPU with nothing to batch or cast, and read only toy prompts ("a red circle").
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.rewards import available_scorers, create_scorer  # noqa: E402
from diffalign.rewards.base import scorer_factory  # noqa: E402

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _accepts(name: str) -> set[str] | None:
    """The keyword arguments the scorer's factory accepts (None: any, it takes **kwargs)."""
    params = inspect.signature(scorer_factory(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def scorer_kwargs(name: str, **wanted) -> dict:
    """`wanted` without the options the scorer's factory does not take (the toy rewards take no dtype)."""
    accepted = _accepts(name)
    return wanted if accepted is None else {k: v for k, v in wanted.items() if k in accepted}


def default_scorers() -> list[str]:
    """The model-based scorers: those whose factory takes a dtype."""
    return [s for s in available_scorers() if (a := _accepts(s)) is None or "dtype" in a]


def bench(name: str, args) -> dict:
    wanted = dict(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if not args.real:
        wanted["tiny"] = True
    scorer = create_scorer(name, **scorer_kwargs(name, **wanted))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.n, 3, args.size, args.size, generator=g)
    prompt = args.prompt
    scorer.score(images[: min(2, args.n)], prompt)  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    batched = scorer.score(images, prompt)
    _sync(args.device)
    t_batched = time.perf_counter() - t0
    scorer.batch_size = 1
    t0 = time.perf_counter()
    single = torch.cat([scorer.score(images[i : i + 1], prompt) for i in range(args.n)])
    _sync(args.device)
    t_single = time.perf_counter() - t0
    return {
        "scorer": name,
        "batched img/s": args.n / t_batched,
        "one-by-one img/s": args.n / t_single,
        "speed-up": t_single / t_batched,
        "mean score": batched.mean().item(),
        "max abs diff": (batched - single).abs().max().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real checkpoints (downloads) instead of tiny random models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--n", type=int, default=16, help="images per scorer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="square image side")
    p.add_argument("--scorers", nargs="*", default=None,
                   help=f"subset of {available_scorers()} (default: the model-based ones)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt every image is scored against")
    args = p.parse_args()
    if not args.real:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    unknown = sorted(set(args.scorers or []) - set(available_scorers()))
    if unknown:
        p.error(f"unknown scorer(s) {', '.join(unknown)}; choose from {', '.join(available_scorers())}")
    rows = [bench(n, args) for n in (args.scorers or default_scorers())]
    mode = "real" if args.real else "tiny random"
    print(f"\n{mode} models, device={args.device}, dtype={args.dtype}, n={args.n}, batch={args.batch_size}, "
          f"{args.size}x{args.size} inputs\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [r["scorer"]] + [f"{r[c]:.1f}" if "img/s" in c or c == "speed-up" else f"{r[c]:.4g}" for c in cols[1:]]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
