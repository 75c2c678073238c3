"""The `diffalign` command. Each subcommand lives in its own module and is imported only when used,
so `diffalign --help` stays fast and a missing optional extra only affects the command that needs it."""

from __future__ import annotations

import importlib
import importlib.util
import sys

from diffalign.errors import DEBUG_FLAG, cli_entry

# name -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("diffalign.training.cli:main", "fine-tune a model on preference data from a YAML config"),
    "train-spm": ("diffalign.training.spm:main", "train SPO's step-aware preference model on preference pairs"),
    "cache": ("diffalign.training.cache:main", "precompute VAE latents and text conditioning for a config"),
    "precompute": ("diffalign.training.precompute:main", "compute a run's reference energies ahead (train.reference=precomputed)"),
    "eval": ("diffalign.evaluation.cli:eval_main", "generate images for a benchmark suite and score them"),
    "score": ("diffalign.evaluation.cli:score_main", "score existing images against their prompts"),
    "synpic": ("diffalign.synpic.cli:main", "generate a Syn-Pic-style ranked preference dataset"),
    "demo": ("diffalign.toy.demo:main", "the whole alignment loop in the toy world, on a CPU"),
    "env": ("diffalign.cli:env_main", "print versions, CUDA and optional extras (paste it into bug reports)"),
}

#: libraries whose versions decide diffalign's behaviour, as (distribution name, label)
CORE_PACKAGES = (
    ("diffusers", "diffusers"), ("transformers", "transformers"), ("accelerate", "accelerate"),
    ("peft", "peft"), ("datasets", "datasets"), ("open_clip_torch", "open_clip"),
    ("safetensors", "safetensors"), ("huggingface_hub", "huggingface_hub"), ("numpy", "numpy"),
    ("pillow", "Pillow"),
)  # fmt: skip
#: optional extras (pyproject's [project.optional-dependencies]) and what they are for
OPTIONAL_EXTRAS = (
    ("xformers", "memory-efficient attention"),
    ("bitsandbytes", "8-bit optimizers"),
    ("wandb", "experiment logging"),
    ("triton", "kernels for torch.compile"),
)
ENV_VARS = ("HF_HOME", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", "DIFFALIGN_CACHE", "DIFFALIGN_SUITES")


def _usage() -> str:
    lines = ["usage: diffalign <command> [options] [--debug]", "       diffalign --version", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `diffalign <command> --help` for a command's options. A known error ends in one line and",
              "exit status 2; --debug (anywhere on the line) shows its traceback."]
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _extra_status(module: str) -> str:
    """'<version>' when it imports, 'not installed', or why the import fails (first line)."""
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # a broken build (e.g. xformers compiled for another torch) fails many ways
        first = (str(err).strip().splitlines() or [""])[0]
        return f"installed, but the import fails: {type(err).__name__}: {first}"
    return str(getattr(mod, "__version__", None) or _version(module) or "importable")


def environment() -> dict[str, str]:
    """What `diffalign env` prints, as label -> value."""
    import os
    import platform

    import diffalign

    info = {
        "diffalign": f"{diffalign.__version__} ({os.path.dirname(diffalign.__file__)})",
        "Python": platform.python_version(),
        "Platform": platform.platform(),
    }
    try:
        import torch
    except Exception as err:
        info["PyTorch"] = f"cannot import: {err}"
    else:
        info["PyTorch"] = torch.__version__
        info["CUDA available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["CUDA / cuDNN"] = f"{torch.version.cuda} / {torch.backends.cudnn.version()}"
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["GPUs"] = f"{len(names)}: " + ", ".join(names)
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            info["MPS available"] = "True"
    for dist, label in CORE_PACKAGES:
        info[label] = _version(dist) or "not installed"
    for module, purpose in OPTIONAL_EXTRAS:
        info[f"{module} ({purpose})"] = _extra_status(module)
    for var in ENV_VARS:
        if var in os.environ:
            info[f"${var}"] = os.environ[var]
    return info


def env_main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="diffalign env", description="print the versions, CUDA status and optional extras diffalign runs with"
    )
    p.parse_args(argv)
    print("diffalign environment (paste this into bug reports)\n")
    for label, value in environment().items():
        print(f"- {label}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv[:1]:  # `diffalign --debug train ...`: the subcommand's entry takes it
        argv = [*argv[1:2], DEBUG_FLAG, *argv[2:]]
    if not argv or argv[0] in ("-h", "--help", DEBUG_FLAG):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from diffalign import __version__

        print(f"diffalign {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffalign: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    if not getattr(func, "is_cli_entry", False):
        func = cli_entry(f"diffalign {name}")(func)
    return func(rest)


if __name__ == "__main__":
    raise SystemExit(main())
