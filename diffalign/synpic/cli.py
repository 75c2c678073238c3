"""`diffalign synpic CONFIG [--out DIR] [--overwrite] [dotted.key=value ...]`

Generates (or resumes) the Syn-Pic dataset a YAML config describes. Run under
`accelerate launch --num_processes N -m diffalign synpic ...` to spread shards over processes.
"""

from __future__ import annotations

import argparse

from diffalign.errors import cli_entry


@cli_entry("diffalign synpic")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffalign synpic",
        description="Generate a Syn-Pic-style ranked preference dataset (prompts x generators x scorers -> phi).",
    )
    parser.add_argument("config", help="YAML config (see docs/synpic.md)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value overrides, e.g. shard_size=32 generators.0.steps=10"
    )
    parser.add_argument("--out", help="output directory (overrides output_dir)")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete what the output directory holds and start over"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from diffalign.configio import parse_cli

    args = parse_cli(parser, argv)

    from diffalign.synpic.config import load_config
    from diffalign.synpic.run import run
    from diffalign.synpic.summary import to_markdown

    overrides = list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides)
    summary = run(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    if summary is not None:
        print(to_markdown(summary))
        print(f"wrote {summary['rows']} rows to {cfg.output_dir}/data (summary: {cfg.output_dir}/summary.md)")
    return 0
