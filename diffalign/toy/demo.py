"""`diffalign demo [--quick] [--out DIR] [--methods a,b] [--process flow]`: the whole alignment loop in the toy
world, with its DDPM base or (`--process flow`) a rectified-flow one.

1. base: the cached toy base model (diffalign.toy.base), trained by the real trainer on first use;
2. data: toy Syn-Pic (`diffalign synpic` code: the base sampled k times per prompt, ranked by the toy reward);
3. align: DPO, DPO + winner-likelihood term, MaPO, RankDPO, DCPO, SFT on winners and SePPO, each a `diffalign train`
   config written to OUT/configs/ (recipes: diffalign/toy/recipes.py) and run by the real Trainer;
4. evaluate: every model and the base on the toyworld suite (`diffalign eval` code), paired on the same
   prompts and seeds, with an exact McNemar test of each method against the base;
5. report: OUT/results.md (before/after table), OUT/grid.png, OUT/bars.png, OUT/index.html, plus the
   evaluation's own OUT/eval/report.html.

Nothing is tuned to make a method look good: if a method hurts, the table shows it. The page reads plain
DPO's logged winner drift: when it is positive (likelihood displacement, which the prototype of this world
hit) it explains the failure and the fix, the winner-likelihood term; otherwise it says so.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from diffalign.toy.recipes import (
    DEFAULT_OUT,
    DEFAULT_OUTS,
    FLOW,
    METHODS,
    QUICK,
    QUICK_FLOW,
    DemoRecipe,
    align_config,
    paths,
    synpic_config,
)

#: the per-image outcome the paired test uses, and the table's columns (scorer name, header)
CORRECT = "toy_correct"
COLUMNS = (("toy_correct", "accuracy"), ("toy_colour_correct", "colour"), ("toy_shape_correct", "shape"),
           ("toy", "reward (0-3)"), ("toy_cleanliness", "cleanliness"))  # fmt: skip
GRID_PROMPTS = (0, 4, 8, 10, 14, 15)  # six of the 18 prompts: every colour, every shape
GRID_SAMPLES = 4


def _stage(log, name: str, t0: float) -> None:
    log(f"\n== {name}  (t = {time.time() - t0:.0f} s)")


def final_metrics(train_dir: str | Path) -> dict:
    """The last logged line of a training run (metrics.jsonl), or {}."""
    path = Path(train_dir) / "logs" / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    return json.loads(lines[-1]) if lines else {}


def run_demo(recipe: DemoRecipe, out: str | Path = DEFAULT_OUT, progress: bool = True, log=print,
             quick: bool = False) -> dict:  # fmt: skip
    """Run every stage into `out`; returns the results (also written to OUT/results.json). `quick`: the
    recipe is the --quick smoke run, which the results and the page say."""
    from diffalign.evaluation.cli import build_scorers
    from diffalign.evaluation.runner import ModelRun, run_eval
    from diffalign.evaluation.suites import load_suite
    from diffalign.sampling.generators import PixelGenerator
    from diffalign.synpic.config import load_config as load_synpic_config
    from diffalign.synpic.run import run as run_synpic
    from diffalign.toy.base import ensure_base, train
    from diffalign.toy.recipes import write_configs

    t0 = time.time()
    out = Path(out)
    p = paths(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU time per stage: what a loaded machine's wall time cannot show

    _stage(log, "1/5 base model", t0)
    t, c = time.time(), time.process_time()
    cached = ensure_base(recipe.base, log=log, progress=progress)
    shutil.rmtree(p["base"], ignore_errors=True)
    shutil.copytree(cached, p["base"])
    seconds["base"] = time.time() - t
    cpu["base"] = time.process_time() - c
    write_configs(p["configs"], out, recipe)
    log(f"configs of every step: {p['configs']}/")

    _stage(log, "2/5 toy Syn-Pic data from the base", t0)
    t, c = time.time(), time.process_time()
    scfg = load_synpic_config(raw=synpic_config(out, recipe))
    syn = run_synpic(scfg, overwrite=True, progress=progress)
    seconds["synpic"] = time.time() - t
    cpu["synpic"] = time.process_time() - c
    log(f"{syn['rows']} rows x {syn['run']['k']} images in {seconds['synpic']:.0f} s")
    if any(METHODS[m].data == "dual_captions" for m in recipe.methods):
        from diffalign.toy.dual_captions import write_dual_caption_data

        counts = write_dual_caption_data(p["data"], p["dual_captions"], recipe.base.size)
        log(f"DCPO pairs, each image captioned by what it shows: {counts}")

    trained = {}
    for i, name in enumerate(recipe.methods, 1):
        _stage(log, f"3/5 align {i}/{len(recipe.methods)}: {METHODS[name].label}", t0)
        t, c = time.time(), time.process_time()
        cfg = align_config(name, out, recipe)
        shutil.rmtree(cfg["output_dir"], ignore_errors=True)
        train(cfg, progress=progress)
        seconds[name] = time.time() - t
        cpu[name] = time.process_time() - c
        trained[name] = Path(cfg["output_dir"])

    _stage(log, "4/5 evaluate on the toyworld suite", t0)
    t, c = time.time(), time.process_time()
    suite = load_suite("toyworld")
    suite = type(suite).model_validate({**suite.model_dump(), "steps": recipe.sample_steps,
                                        "guidance": recipe.guidance,
                                        "images_per_prompt": recipe.eval_images_per_prompt})  # fmt: skip

    def gen(model: str, label: str) -> PixelGenerator:
        return PixelGenerator(model, name=label, steps=suite.steps, guidance=suite.guidance,
                              height=recipe.base.size, width=recipe.base.size)  # fmt: skip

    runs = [ModelRun("base", gen(p["base"], "base"), description=p["base"])]
    runs += [ModelRun(n, gen(str(d / "final"), n), description=str(d / "final")) for n, d in trained.items()]
    shutil.rmtree(p["eval"], ignore_errors=True)  # the models were retrained: no stale images
    settings = {"suite": suite.name, "steps": suite.steps, "guidance": suite.guidance, "sampler": suite.sampler,
                "images_per_prompt": suite.images_per_prompt, "seeds": suite.seeds.model_dump()}  # fmt: skip
    summary = run_eval(suite, runs, build_scorers(suite.scorers), p["eval"], settings=settings,
                       gen_batch_size=1024, score_batch_size=1024, progress=progress)  # fmt: skip
    seconds["eval"] = time.time() - t
    cpu["eval"] = time.process_time() - c

    _stage(log, "5/5 report", t0)
    results = collect(summary, {r.label: r.rows for r in runs}, trained, recipe)
    results["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    results["seconds"]["total"] = round(time.time() - t0, 1)
    results["cpu_seconds"] = {k: round(v, 1) for k, v in cpu.items()}
    results["out"] = str(out)
    results["quick"] = quick
    table = results_markdown(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_grid(runs, p["eval"], out / "grid.png", recipe)
    write_bars(results, out / "bars.png")
    write_html(results, table, out / "index.html")
    results["seconds"]["total"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ---- results -----------------------------------------------------------------------------------------


def collect(summary: dict, rows: dict[str, list[dict]], trained: dict[str, Path], recipe: DemoRecipe) -> dict:
    """Per model: the suite's means and standard errors, the paired McNemar test against the base on
    toy_correct, and the final logged training metrics (winner / loser drift, implicit accuracy)."""
    from diffalign.evaluation.stats import paired_mcnemar

    models = {}
    for label, entry in summary["models"].items():
        scores = entry["scores"]
        row = {"label": "base" if label == "base" else METHODS[label].label,
               "scores": {k: {"mean": scores[k]["mean"], "sem": scores[k]["sem"]} for k, _ in COLUMNS if k in scores},
               "n": scores[CORRECT]["n"] if CORRECT in scores else 0}  # fmt: skip
        if label != "base":
            row["mcnemar"] = paired_mcnemar(rows[label], rows["base"], CORRECT)
            m = final_metrics(trained[label])
            row["train"] = {k: m.get(k) for k in ("loss", "implicit_acc", "drift_w", "drift_l", "err_w", "err_l",
                                                  "flip_frac")}  # fmt: skip
            row["objective"] = METHODS[label].objective
            if label == "seppo":  # SePPO learns from the winners alone: also paired against DPO and SFT on them
                row["mcnemar_vs"] = {o: paired_mcnemar(rows[label], rows[o], CORRECT) for o in ("dpo", "sft_winners")
                                     if o in rows}  # fmt: skip
        models[label] = row
    return {"models": models, "suite": summary["suite"], "prompts": summary["prompts"],
            "images_per_prompt": summary["images_per_prompt"], "recipe": _recipe_dict(recipe)}  # fmt: skip


def _recipe_dict(recipe: DemoRecipe) -> dict:
    from dataclasses import asdict

    return asdict(recipe)


def _num(v, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _p(v) -> str:
    return "-" if v is None else (f"{v:.1e}" if v < 1e-3 else f"{v:.3f}")


QUICK_NOTE = ("This is a `diffalign demo --quick` smoke run: a tiny model trained for a few steps, to check that "
              "every stage works. Its numbers mean nothing; run `diffalign demo` for the comparison.")  # fmt: skip


def quick_note(results: dict) -> str:
    """The warning a --quick run's table and page carry ("" for a full run)."""
    return QUICK_NOTE if results.get("quick") else ""


def results_markdown(results: dict) -> str:
    base = results["models"]["base"]["scores"][CORRECT]["mean"]
    head = ["model"] + [h for _, h in COLUMNS] + ["Δ accuracy", "better / worse images", "McNemar p vs base",
                                                  "drift_w", "drift_l"]  # fmt: skip
    process = results.get("recipe", {}).get("base", {}).get("process", "ddpm")
    world = "Toy world" if process == "ddpm" else "Toy world with a flow-matching base (velocity, Euler sampling)"
    lines = [f"**{quick_note(results)}**", ""] if quick_note(results) else []
    lines += [f"{world}, {results['prompts']} prompts x {results['images_per_prompt']} images, the same seeds for "
             "every model (mean ± standard error).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for name, m in results["models"].items():
        cells = [m["label"]]
        for key, _ in COLUMNS:
            s = m["scores"].get(key)
            cells.append(f"{s['mean']:.3f} ± {s['sem']:.3f}" if s else "-")
        if name == "base":
            cells += ["", "", "", "", ""]
        else:
            mc, tr = m["mcnemar"] or {}, m["train"]
            cells.append(f"{m['scores'][CORRECT]['mean'] - base:+.3f}")
            cells.append(f"{mc.get('a_only', '-')} / {mc.get('b_only', '-')}")
            cells.append(_p(mc.get("p_value")))
            cells.append(_num(tr.get("drift_w"), "{:+.2e}"))
            cells.append(_num(tr.get("drift_l"), "{:+.2e}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "better / worse images: images this model gets right and the base wrong, and the reverse "
              "(the discordant pairs of the exact McNemar test). drift_w / drift_l: the last logged "
              "policy-minus-reference denoising error of the preferred / rejected images (needs a reference "
              "model: not logged for MaPO and SFT). Positive drift_w: the preferred images became LESS likely.", ""]
    for m in results["models"].values():
        for other, mc in (m.get("mcnemar_vs") or {}).items():
            if mc:
                lines.append(f"{m['label']} against {results['models'][other]['label']}: better / worse images "
                             f"{mc['a_only']} / {mc['b_only']}, McNemar p = {_p(mc['p_value'])}.")  # fmt: skip
    if "seconds" in results:
        s = results["seconds"]
        lines.append("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()) + ".")
    return "\n".join(lines) + "\n"


def dpo_story(results: dict) -> str:
    """What the measured numbers say about plain DPO and the winner-likelihood term (HTML paragraph)."""
    models = results["models"]
    base = models["base"]["scores"][CORRECT]["mean"]
    parts = []
    dpo = models.get("dpo")
    if dpo:
        acc, tr, mc = dpo["scores"][CORRECT]["mean"], dpo["train"], dpo["mcnemar"] or {}
        pv = mc.get("p_value")
        verdict = ("did not change accuracy significantly" if pv is None or pv >= 0.05
                   else "lowered accuracy" if acc < base else "raised accuracy")  # fmt: skip
        parts.append(f"<p>Plain Diffusion-DPO {verdict}: {base:.3f} for the base, {acc:.3f} after "
                     f"(McNemar p = {_p(pv)}). Its final implicit accuracy on the training pairs was "
                     f"{_num(tr.get('implicit_acc'), '{:.2f}')}.</p>")  # fmt: skip
        dw, dl = tr.get("drift_w"), tr.get("drift_l")
        if dw is not None and dl is not None:
            if dw > 0:
                parts.append(
                    f"<p><b>Likelihood displacement.</b> DPO only sees the <i>margin</i> between the winner's and "
                    f"the loser's error relative to the reference. It can widen that margin by making "
                    f"<i>both</i> images less likely, as long as the loser gets worse faster. That is what the log "
                    f"shows: the winner's drift (policy minus reference denoising error) ended at {dw:+.2e} "
                    f"&gt; 0 and the loser's at {dl:+.2e}. So the model learned to denoise preferred images worse "
                    f"than before; the prototype of this world found that this shows up in the samples, "
                    f"worst under strong classifier-free guidance.</p>")  # fmt: skip
            else:
                parts.append(f"<p>The winner's drift ended at {dw:+.2e} (loser {dl:+.2e}): in this run the "
                             "preferred images did not become less likely. docs/demo.md has a run at lr 3e-4 "
                             "where they did, and the gain shrank.</p>")  # fmt: skip
    fix = models.get("dpo_winner")
    if fix:
        acc, tr, mc = fix["scores"][CORRECT]["mean"], fix["train"], fix["mcnemar"] or {}
        w = fix["objective"].get("winner_weight")
        parts.append(
            f"<p><b>The fix: a winner-likelihood term.</b> <code>objective.winner_weight: {w:g}</code> adds "
            f"{w:g} x mean(e<sub>w</sub>), an SFT term on the preferred image (RPO-style), to the DPO loss. It "
            f"pins the preferred image's likelihood, so the margin must be won by pushing the loser away. "
            f"The weight must make its gradient comparable to DPO's (in the prototype of this world a weight of 1 did nothing). "
            f"Result: accuracy {acc:.3f} vs base {base:.3f} (McNemar p = {_p(mc.get('p_value'))}); "
            f"final winner drift {_num(tr.get('drift_w'), '{:+.2e}')}.</p>")  # fmt: skip
    return "\n".join(parts)


def write_grid(runs, eval_dir: str | Path, path: Path, recipe: DemoRecipe, scale: int = 4) -> Path:
    """Side-by-side samples: one block per model (columns), six prompts (rows) x four seeds. Result rows
    name their images relative to `eval_dir` (the run_eval output folder)."""
    from PIL import Image, ImageDraw

    by_model = {r.label: {(row["index"], row["sample"]): row for row in r.rows} for r in runs}
    size = recipe.base.size * scale
    samples = min(GRID_SAMPLES, recipe.eval_images_per_prompt)
    prompts = [i for i in GRID_PROMPTS if any(k[0] == i for k in next(iter(by_model.values())))]
    gap, left, top = 8, 110, 20
    block = samples * size
    W = left + len(runs) * (block + gap)
    H = top + len(prompts) * size
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    eval_dir = Path(eval_dir)
    for j, r in enumerate(runs):
        x0 = left + j * (block + gap)
        name = "base" if r.label == "base" else METHODS[r.label].label
        draw.text((x0 + 2, 4), name, fill=(0, 0, 0))
        for i, idx in enumerate(prompts):
            for s in range(samples):
                row = by_model[r.label].get((idx, s))
                if row is None:
                    continue
                img = Image.open(eval_dir / row["image"]).convert("RGB").resize((size, size), Image.NEAREST)
                grid.paste(img, (x0 + s * size, top + i * size))
                if row["scores"].get(CORRECT) == 1.0:  # a green tick corner for images that follow the prompt
                    draw.rectangle((x0 + s * size, top + i * size, x0 + s * size + 5, top + i * size + 5),
                                   fill=(0, 200, 0))  # fmt: skip
    first = next(iter(by_model.values()))
    for i, idx in enumerate(prompts):
        prompt = next(v["prompt"] for k, v in first.items() if k[0] == idx)
        draw.text((4, top + i * size + size // 2 - 5), prompt, fill=(0, 0, 0))
    grid.save(path)
    return path


def write_bars(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("toy_correct", "accuracy"), ("toy_colour_correct", "colour"), ("toy_shape_correct", "shape"),
            ("toy_cleanliness", "cleanliness")]  # fmt: skip
    models = list(results["models"].items())
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(models)
    for j, (_name, m) in enumerate(models):
        vals = [m["scores"][k]["mean"] for k, _ in keys]
        errs = [m["scores"][k]["sem"] for k, _ in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width=width, yerr=errs, capsize=2,
               label=m["label"], color=f"C{j}")  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [h for _, h in keys])
    ax.set_ylim(0, 1.05)
    ax.axhline(results["models"]["base"]["scores"]["toy_correct"]["mean"], color="k", lw=0.7, ls="--")
    ax.set_title("toy world: before (base) and after alignment (mean ± s.e.; dashed: base accuracy)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _md_table_to_html(md: str) -> str:
    rows = [ln for ln in md.splitlines() if ln.startswith("|") and not set(ln) <= set("|-")]
    out = ["<table>"]
    for i, ln in enumerate(rows):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        tag = "th" if i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    out.append("</table>")
    notes = [ln for ln in md.splitlines() if ln and not ln.startswith("|") and QUICK_NOTE not in ln]  # a banner
    return "\n".join(out) + "".join(f"<p>{html.escape(n)}</p>" for n in notes)


def write_html(results: dict, table_md: str, path: Path) -> Path:
    methods = [m for m in results["models"] if m != "base"]
    items = "".join(f"<li><b>{html.escape(METHODS[m].label)}</b>: {html.escape(METHODS[m].note)}; "
                    f"<code>configs/toy_{m}.yaml</code></li>" for m in methods)  # fmt: skip
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>diffalign demo: toy world</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 7px;font-size:13px}}img{{image-rendering:pixelated}}</style></head><body>
<h1>diffalign demo: preference alignment in the toy world</h1>
{f"<p style='border:2px solid #c00;padding:6px'><b>{html.escape(quick_note(results))}</b></p>" if quick_note(results) else ""}
<p>A tiny pixel-space text-to-image model (the <b>base</b>) was trained on rendered shapes whose captions were
deliberately corrupted, so it follows prompts like "a red circle" only part of the time. It then generated
its own preference data (toy Syn-Pic: {results['recipe']['k']} samples per prompt group, ranked by a programmatic
reward), and each method below fine-tuned it on that data through diffalign's trainer:</p><ul>{items}</ul>
<p>Every model was sampled on the same {results['prompts']} prompts x {results['images_per_prompt']} held-out
seeds; "accuracy" is the share of images with the right colour <i>and</i> shape, and the p-value is an exact
McNemar test against the base on those paired images.</p>
<h2>Before / after</h2>{_md_table_to_html(table_md)}
<h2>Why plain DPO can fail here</h2>{dpo_story(results)}
<h2>Samples (same seeds in every column block; green corner = follows the prompt)</h2>
<img src='grid.png' alt='image grid'>
<h2>Metrics</h2><img src='bars.png' alt='bar plot'>
<p>Full evaluation report with every image and score distribution: <a href='eval/report.html'>eval/report.html</a>.
Configs of every step: <code>configs/</code>; training logs: <code>train/&lt;method&gt;/logs/metrics.jsonl</code>.</p>
</body></html>"""
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffalign demo", description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("--quick", action="store_true", help="a smoke run of every stage in seconds (numbers mean nothing)")
    p.add_argument("--out", help=f"output folder (default {DEFAULT_OUTS['ddpm']}; {DEFAULT_OUTS['flow']} with "
                                 "--process flow)")  # fmt: skip
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--process", choices=("ddpm", "flow"), default="ddpm",
                   help="the toy base's noise process: ddpm (x0 prediction, DDIM) or flow (rectified flow, velocity, "
                        "Euler); default ddpm")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.out = args.out or DEFAULT_OUTS[args.process]
    if args.process == "flow":
        recipe = QUICK_FLOW if args.quick else FLOW
    else:
        recipe = QUICK if args.quick else DemoRecipe()
    if args.methods:
        chosen = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            print(f"diffalign demo: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
            return 2
        recipe = replace(recipe, methods=chosen)
    if args.no_progress:  # also the weight loading / saving bars of diffusers and transformers
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    results = run_demo(recipe, args.out, progress=not args.no_progress, quick=args.quick)
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"wrote {out / 'index.html'}, {out / 'results.md'}, {out / 'grid.png'}, {out / 'bars.png'}, "
          f"{out / 'eval' / 'report.html'} in {results['seconds']['total']:.0f} s")  # fmt: skip
    return 0
