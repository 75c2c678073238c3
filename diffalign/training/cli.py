"""`diffalign train CONFIG [key.path=value ...] [--output-dir DIR] [--resume latest|PATH] [--overwrite] [--debug]`
(and the same for `diffalign train-spm`, diffalign/training/spm.py)"""

from __future__ import annotations

import argparse

from diffalign.errors import cli_entry


@cli_entry("diffalign train")
def main(argv: list[str] | None = None) -> int:
    from diffalign.config import load_config

    return run_command(argv, "diffalign train", "Fine-tune a model on preference data.", "configs/tiny_dpo.yaml",
                       load_config, "diffalign.training.trainer:Trainer", hub=True)  # fmt: skip


def run_command(argv, prog: str, description: str, example: str, load, trainer: str, hub: bool = False) -> int:
    """`prog CONFIG [key.path=value ...] [--output-dir DIR] [--resume latest|PATH] [--overwrite]`: load the
    config with `load`, then train with the trainer class `trainer` names. The caller is wrapped in
    `cli_entry(prog)`, which turns a known error into one line and exit 2."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="--debug shows the traceback of a known error.")  # fmt: skip
    p.add_argument("config", help=f"YAML recipe, e.g. {example}")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, anywhere on the line: train.max_steps=100 objective.beta=2500")
    p.add_argument("--output-dir", help="where logs, checkpoints and the export go (overrides output_dir)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder; 'latest' starts fresh if none exists")
    if hub:
        p.add_argument("--push-to-hub", action="store_true",
                       help="upload each checkpoint and the final export with its model card to the hub (hub.push)")
        p.add_argument("--hub-model-id",
                       help="the hub repo, name or org/name (hub.model_id; default: the output folder's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints, export, logs and validation images a run left in the output dir")  # fmt: skip

    from diffalign.configio import parse_cli
    from diffalign.lazy import load_attr

    args = parse_cli(p, argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    if hub:
        overrides += ["hub.push=true"] if args.push_to_hub else []
        overrides += [f"hub.model_id={args.hub_model_id}"] if args.hub_model_id else []
    cfg = load(args.config, overrides)
    load_attr(trainer)(cfg, resume=args.resume, overwrite=args.overwrite).train()
    print(f"done: {cfg.output_dir}/final")
    return 0
