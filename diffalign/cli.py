"""The `diffalign` command. Each subcommand lives in its own module and is imported only when used,
so `diffalign --help` stays fast and a missing optional extra only affects the command that needs it."""

from __future__ import annotations

import importlib
import sys

# name -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("diffalign.training.cli:main", "fine-tune a model on preference data from a YAML config"),
    "cache": ("diffalign.training.cache:main", "precompute VAE latents and text conditioning for a config"),
    "eval": ("diffalign.evaluation.cli:eval_main", "generate images for a benchmark suite and score them"),
    "score": ("diffalign.evaluation.cli:score_main", "score existing images against their prompts"),
    "synpic": ("diffalign.synpic.cli:main", "generate a Syn-Pic-style ranked preference dataset"),
    "demo": ("diffalign.toy.demo:main", "the whole alignment loop in the toy world, on a CPU"),
}


def _usage() -> str:
    lines = ["usage: diffalign <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `diffalign <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffalign: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
