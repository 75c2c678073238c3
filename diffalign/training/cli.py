"""`diffalign train CONFIG [key.path=value ...] [--output-dir DIR] [--resume latest|PATH]` (and the same for
`diffalign train-spm`, diffalign/training/spm.py)"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from diffalign.config import load_config

    return run_command(argv, "diffalign train", "Fine-tune a model on preference data.", "configs/tiny_dpo.yaml",
                       load_config, "diffalign.training.trainer:Trainer")  # fmt: skip


def run_command(argv, prog: str, description: str, example: str, load, trainer: str) -> int:
    """`prog CONFIG [key.path=value ...] [--output-dir DIR] [--resume latest|PATH]`: load the config with `load`
    (exit 2 with a one-line message when it is invalid), then train with the trainer class `trainer` names."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("config", help=f"YAML recipe, e.g. {example}")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 objective.beta=2500")
    p.add_argument("--output-dir", help="where logs, checkpoints and the export go (overrides output_dir)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder; 'latest' starts fresh if none exists")
    args = p.parse_args(argv)

    from diffalign.config import ConfigError
    from diffalign.lazy import load_attr

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        cfg = load(args.config, overrides)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    try:
        run = load_attr(trainer)(cfg, resume=args.resume)
    except ConfigError as err:  # a setting this machine cannot run (e.g. train.compile without a compiler)
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    run.train()
    print(f"done: {cfg.output_dir}/final")
    return 0
