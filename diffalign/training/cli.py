"""`diffalign train CONFIG [key.path=value ...] [--output-dir DIR] [--resume latest|PATH]`"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffalign train", description="Fine-tune a model on preference data.")
    p.add_argument("config", help="YAML recipe, e.g. configs/tiny_dpo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 objective.beta=2500")
    p.add_argument("--output-dir", help="where logs, checkpoints and the export go (overrides output_dir)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder; 'latest' starts fresh if none exists")
    args = p.parse_args(argv)

    from diffalign.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"diffalign train: {err}", file=sys.stderr)
        return 2
    from diffalign.training.trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
    except ConfigError as err:  # a setting this machine cannot run (e.g. train.compile without a compiler)
        print(f"diffalign train: {err}", file=sys.stderr)
        return 2
    trainer.train()
    print(f"done: {cfg.output_dir}/final")
    return 0
