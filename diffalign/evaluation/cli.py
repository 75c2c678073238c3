"""`diffalign eval` and `diffalign score`."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path


def _device_default() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_scorers(specs: list[str], device: str | None = None) -> dict:
    """Scorers by registry name (diffalign.rewards) or as `package.module:factory`. A device is passed to
    factories that take one."""
    from diffalign.lazy import load_attr
    from diffalign.rewards.base import scorer_factory

    out = {}
    for spec in specs:
        if ":" in spec:
            try:
                factory = load_attr(spec)
            except (ImportError, AttributeError, ValueError) as e:
                raise KeyError(f"scorer {spec!r} cannot be imported: {e}") from e
            name = None
        else:
            factory = scorer_factory(spec)
            name = spec
        kwargs = {}
        if device is not None:
            try:
                params = inspect.signature(factory).parameters
                if "device" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    kwargs["device"] = device
            except (TypeError, ValueError):
                pass
        scorer = factory(**kwargs)
        out[name or getattr(scorer, "name", spec.partition(":")[2])] = scorer
    return out


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _geneval_fn(args):
    """A callable image_dir -> (rows, detector note), building the detector and colour model once."""
    from diffalign.evaluation import geneval as ge

    state = {}

    def run(image_dir: Path):
        if "det" not in state:
            if args.detector == "mmdet":
                if not ge.mmdet_available():
                    raise SystemExit("--detector mmdet needs mmdet 2.x installed (see docs/evaluation.md)")
                if not (args.mmdet_config and args.mmdet_checkpoint):
                    raise SystemExit("--detector mmdet needs --mmdet-config and --mmdet-checkpoint")
                state["det"] = ge.MMDetDetector(args.mmdet_config, args.mmdet_checkpoint, device=args.device)
            else:
                state["det"] = ge.Mask2FormerDetector(args.detector_model, device=args.device)
            state["clf"] = ge.ColorClassifier(args.color_model, pretrained=args.color_pretrained, device=args.device)
        rows = ge.evaluate_folder(image_dir, state["det"], state["clf"], progress=not args.quiet)
        return rows, state["det"].describe()

    return run


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorers", help="comma-separated scorer names or module:factory specs")
    p.add_argument("--out", help="output folder")
    p.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--score-batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    g = p.add_argument_group("GenEval")
    g.add_argument("--detector", choices=["mask2former", "mmdet"], default="mask2former")
    g.add_argument("--detector-model", default="facebook/mask2former-swin-small-coco-instance")
    g.add_argument("--mmdet-config")
    g.add_argument("--mmdet-checkpoint")
    g.add_argument("--color-model", default="ViT-L-14", help="open_clip model for GenEval colours")
    g.add_argument("--color-pretrained", default="openai")


def eval_main(argv: list[str] | None = None) -> int:
    from diffalign.evaluation.layout import LayoutError
    from diffalign.evaluation.runner import ModelRun, ResumeMismatch, UnreadableImages, model_label, run_eval
    from diffalign.evaluation.suites import SuiteError, load_suite
    from diffalign.sampling.generators import ModelLoadError, is_pixel_folder, make_generator

    p = argparse.ArgumentParser(prog="diffalign eval", description="generate a suite's images and score them")
    p.add_argument("--model", required=True, help="hub id or diffusers folder (the base, with --lora)")
    p.add_argument("--lora", help="LoRA weights folder loaded on top of --model")
    p.add_argument("--name", help="label for the model in the report")
    p.add_argument("--suite", required=True, help="suite name (eval/suites/) or YAML path")
    p.add_argument("--compare", help="a second model (hub id or folder) to put side by side")
    p.add_argument("--compare-lora", help="LoRA folder for the --compare model")
    p.add_argument("--compare-name")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on cuda, else float32")
    p.add_argument("--batch-size", type=int, help="images per generation call (default 4; 256 for pixel-space models)")
    p.add_argument("--steps", type=int, help="override the suite's steps")
    p.add_argument("--guidance", type=float, help="override the suite's guidance")
    p.add_argument("--images-per-prompt", type=int, help="override the suite's images per prompt")
    p.add_argument("--resolution", type=int, help="override the suite's resolution (square)")
    p.add_argument("--sampler", help="override the suite's sampler")
    p.add_argument("--no-geneval", action="store_true", help="skip the GenEval detector even if the suite asks")
    p.add_argument(
        "--allow-code-in-suites", action="store_true",
        help="let the suite file import and run Python code (a `callable` prompt source or `module:factory` "
        "scorers); refused by default because a suite file is data",
    )  # fmt: skip
    _add_common(p)
    args = p.parse_args(argv)
    args.device = args.device or _device_default()
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    try:
        suite = load_suite(args.suite, allow_code=args.allow_code_in_suites)
        updates = {
            k: v
            for k, v in {
                "steps": args.steps, "guidance": args.guidance, "images_per_prompt": args.images_per_prompt,
                "resolution": args.resolution, "sampler": args.sampler,
            }.items()
            if v is not None
        }  # fmt: skip
        if updates:
            suite = type(suite).model_validate({**suite.model_dump(), **updates})
        scorer_names = _split(args.scorers) if args.scorers is not None else suite.scorers
        out = Path(args.out or Path("runs") / "eval" / suite.name)
        h, w = suite.height_width
        settings = {
            "suite": suite.name, "steps": suite.steps, "guidance": suite.guidance, "sampler": suite.sampler,
            "height": h, "width": w, "negative_prompt": suite.negative_prompt, "dtype": dtype,
            "images_per_prompt": suite.images_per_prompt, "seeds": suite.seeds.model_dump(),
        }  # fmt: skip
        if args.batch_size is None:
            args.batch_size = 256 if is_pixel_folder(args.model) else 4
        specs = [(args.model, args.lora, args.name)]
        if args.compare:
            specs.append((args.compare, args.compare_lora, args.compare_name))
        runs = []
        for model, lora, name in specs:
            label = name or model_label(model, lora)
            if runs and label == runs[0].label:
                label += "-2"
            gen = make_generator(
                model, lora, device=args.device, dtype=dtype, sampler=suite.sampler, name=label,
                steps=suite.steps, guidance=suite.guidance, height=h, width=w,
                negative_prompt=suite.negative_prompt, batch_size=args.batch_size,
            )  # fmt: skip
            runs.append(ModelRun(label, gen, description=model + (f" + LoRA {lora}" if lora else "")))
        scorers = build_scorers(scorer_names, args.device)
        geneval = _geneval_fn(args) if "geneval" in suite.metrics and not args.no_geneval else None
        summary = run_eval(
            suite, runs, scorers, out, limit=args.limit, settings=settings, geneval=geneval,
            gen_batch_size=args.batch_size, score_batch_size=args.score_batch_size,
            progress=not args.quiet, report=not args.no_report,
        )  # fmt: skip
    except (SuiteError, ModelLoadError, LayoutError, ResumeMismatch, UnreadableImages, KeyError) as e:
        print(f"diffalign eval: error: {e}", file=sys.stderr)
        return 2
    for label, m in summary["models"].items():
        g = m["generation"]
        print(f"{label}: generated {g['generated']} images, kept {g['kept']}")
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'summary.md'}" + ("" if args.no_report else f" and {out / 'report.html'}"))
    return 0


def score_main(argv: list[str] | None = None) -> int:
    from diffalign.atomic import write_atomic
    from diffalign.evaluation import report
    from diffalign.evaluation.layout import LayoutError
    from diffalign.evaluation.runner import (
        flat_entries,
        layout_entries,
        score_entries,
        summarize_scores,
        write_jsonl,
    )
    from diffalign.evaluation.suites import SuiteError, read_prompt_file

    p = argparse.ArgumentParser(prog="diffalign score", description="score existing images against their prompts")
    p.add_argument("--images", required=True, help="GenEval-layout folder (<index>/samples/<k>.png) or a flat folder")
    p.add_argument("--prompts", help="prompt file (.txt lines or .jsonl); line i is prompt index i")
    p.add_argument("--name", default="images", help="label in the report")
    p.add_argument("--geneval", action="store_true", help="also run GenEval on a GenEval-layout folder")
    _add_common(p)
    args = p.parse_args(argv)
    args.device = args.device or _device_default()
    out = Path(args.out or Path(args.images).parent / (Path(args.images).name + "_scores"))
    try:
        prompts = None
        if args.prompts:
            if not Path(args.prompts).is_file():
                raise SuiteError(f"prompt file {args.prompts!r} not found")
            prompts = [x if isinstance(x, str) else x["prompt"] for x in read_prompt_file(args.prompts)]
        images = Path(args.images)
        if not images.is_dir():
            raise LayoutError(f"image folder {args.images!r} does not exist")
        has_layout = any(c.is_dir() and c.name.isdigit() for c in images.iterdir())
        if has_layout:
            entries = layout_entries(images, prompts)
        elif prompts is None:
            raise LayoutError(f"{args.images!r} is a flat folder of images: pass --prompts")
        else:
            entries = flat_entries(images, prompts)
        entries = [e for e in entries if args.limit is None or e["index"] < args.limit]
        scorers = build_scorers(_split(args.scorers), args.device)
        if not scorers and not args.geneval:
            raise SuiteError("nothing to do: pass --scorers and/or --geneval")
        out.mkdir(parents=True, exist_ok=True)
        skipped: list[dict] = []
        rows = score_entries(entries, scorers, args.name, args.score_batch_size, not args.quiet, rel_to=out,
                             skipped=skipped)  # fmt: skip
        write_jsonl(rows, out / "scores.jsonl")
        summary = {"suite": f"score {images}", "prompts": len({r['index'] for r in rows}),
                   "images_per_prompt": "-", "models": {args.name: {"scores": summarize_scores(rows)}}}  # fmt: skip
        if skipped:
            summary["models"][args.name]["skipped"] = skipped
        if args.geneval:
            from diffalign.evaluation.geneval import summarize, write_results

            if not has_layout:
                raise LayoutError("--geneval needs a GenEval-layout folder with metadata.jsonl in each prompt folder")
            results, note = _geneval_fn(args)(images)
            write_results(results, out / "geneval_results.jsonl")
            summary["models"][args.name]["geneval"] = {**summarize(results).to_dict(), "detector": note}
    except (SuiteError, LayoutError, ValueError, KeyError) as e:
        print(f"diffalign score: error: {e}", file=sys.stderr)
        return 2
    write_atomic(out / "summary.md", report.summary_markdown(summary))
    if not args.no_report:
        report.write_html_report(summary, {args.name: rows}, out)
    print((out / "summary.md").read_text(encoding="utf-8"))
    return 0
