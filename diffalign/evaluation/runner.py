"""Generate a suite's images (resumable), score them, summarise, compare two models.

Output of `run_eval(out_dir=OUT)`:

    OUT/<model label>/images/<index:05d>/{metadata.jsonl, samples/<k:04d>.png}   GenEval layout
    OUT/<model label>/run.json          the generation settings (a resumed run must match them)
    OUT/<model label>/scores.jsonl      one row per image: prompt, group, seed, image, {scorer: value}
    OUT/<model label>/geneval_results.jsonl   official results.jsonl layout (GenEval suites only)
    OUT/summary.json, OUT/summary.md, OUT/report.html (+ OUT/comparison.jsonl with --compare)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffalign.atomic import atomic_path, write_atomic
from diffalign.evaluation.layout import read_layout, sample_path, write_metadata
from diffalign.evaluation.suites import PromptItem, Suite

_log = logging.getLogger(__name__)


class ResumeMismatch(RuntimeError):
    """The output folder holds images made with other settings."""


def model_label(model: str, lora: str | None = None) -> str:
    def slug(s: str) -> str:
        s = str(s).rstrip("/\\")
        parts = [p for p in re.split(r"[\\/]", s) if p]
        s = "_".join(parts[-2:]) if not Path(s).exists() else parts[-1]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "model"

    return slug(model) + (f"+lora-{slug(lora)}" if lora else "")


# ----------------------------------------------------------------------------------------- generation


def generate_images(
    generator: Callable[[list[str], list[int]], list[Image.Image]],
    suite: Suite,
    items: Sequence[PromptItem],
    image_dir: str | Path,
    settings: dict | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Make every missing image of `items` in the GenEval layout. Images already on disk are kept; a
    resumed run must use the same settings (checked against run.json next to the image folder)."""
    from tqdm.auto import tqdm

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    run_file = image_dir.parent / "run.json"
    settings = dict(settings or {})
    if run_file.exists():
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except ValueError:  # left empty by a kill under an older version (it is written atomically now)
            raise ResumeMismatch(
                f"{run_file} is empty or unreadable (a killed run?); use another --out, or delete it to resume "
                "if the images there were made with these settings"
            ) from None
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ResumeMismatch(
                f"{image_dir} holds images made with other settings {diff}; use another --out or delete it"
            )
    write_atomic(run_file, json.dumps(settings, indent=2, sort_keys=True))

    jobs = []  # (prompt, seed, path)
    for item in items:
        write_metadata(image_dir, item.index, item.metadata)
        for k in range(suite.images_per_prompt):
            path = sample_path(image_dir, item.index, k)
            if not path.is_file():
                jobs.append((item.prompt, suite.seed_for(item.index, k), path))
    total = len(items) * suite.images_per_prompt
    bar = tqdm(total=len(jobs), desc=f"generate {image_dir.parent.name}", unit="img", disable=not progress)
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        images = generator([j[0] for j in chunk], [j[1] for j in chunk])
        if len(images) != len(chunk):
            raise RuntimeError(f"generator returned {len(images)} images for {len(chunk)} requests")
        for (_, _, path), img in zip(chunk, images, strict=True):
            with atomic_path(path) as tmp:  # an interrupted run leaves no half image
                img.save(tmp)
        bar.update(len(chunk))
    bar.close()
    return {"generated": len(jobs), "kept": total - len(jobs), "total": total}


# ----------------------------------------------------------------------------------------- scoring


def layout_entries(
    image_dir: str | Path,
    prompts: Sequence[str] | None = None,
    seed_fn: Callable[[int, int], int] | None = None,
    indices: set[int] | None = None,
) -> list[dict]:
    """One row (without scores) per image of a GenEval-layout folder. Prompts come from each folder's
    metadata.jsonl, or from `prompts[index]` when given."""
    rows = []
    for f in read_layout(image_dir, require_metadata=prompts is None):
        if indices is not None and f.index not in indices:
            continue
        if prompts is not None:
            if f.index >= len(prompts):
                raise ValueError(f"image folder {f.index:05d} has no prompt (the prompt file has {len(prompts)})")
            prompt = prompts[f.index]
        else:
            prompt = f.prompt
        group = f.metadata.get("group", f.metadata.get("tag"))
        for p in f.images:
            k = int(p.stem)
            rows.append({"index": f.index, "sample": k, "prompt": prompt, "group": group,
                         "seed": seed_fn(f.index, k) if seed_fn else None, "path": str(p)})  # fmt: skip
    return rows


def flat_entries(image_dir: str | Path, prompts: Sequence[str]) -> list[dict]:
    """Rows for a flat folder of images: files named by prompt index (`00012.png`, HPSv2 style) are
    matched by number, otherwise the sorted files are matched to the prompts line by line."""
    exts = {".png", ".jpg", ".jpeg", ".webp"}
    files = sorted(p for p in Path(image_dir).iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"{image_dir} holds no images (.png/.jpg/.jpeg/.webp) and no GenEval-layout folders")
    if all(p.stem.isdigit() for p in files):
        pairs = [(int(p.stem), p) for p in files]
        bad = [p.name for i, p in pairs if i >= len(prompts)]
        if bad:
            raise ValueError(f"images {bad[:3]} have no prompt line (the prompt file has {len(prompts)})")
    elif len(files) == len(prompts):
        pairs = list(enumerate(files))
    else:
        raise ValueError(f"{len(files)} images but {len(prompts)} prompts, and the file names are not prompt indices")
    return [{"index": i, "sample": 0, "prompt": prompts[i], "group": None, "seed": None, "path": str(p)} for i, p in pairs]


class UnreadableImages(ValueError):
    """None of the image files to score could be read."""


def score_entries(
    entries: list[dict],
    scorers: dict,
    model: str = "model",
    batch_size: int = 16,
    progress: bool = True,
    rel_to: str | Path | None = None,
    skipped: list[dict] | None = None,
) -> list[dict]:
    """Score rows from `layout_entries` / `flat_entries` with every scorer; returns result rows.

    Image files are read with the training data's decode rule (`diffalign.data.transforms.decode_image`:
    EXIF orientation, 16-bit grey scaled, transparency composited onto white; docs/data.md), once per
    file for all scorers. A file that cannot be read is left out of the result with a warning naming it,
    and recorded in `skipped` ({"path", "reason"}) when a list is given; if no file can be read, or there
    is nothing to score, UnreadableImages is raised."""
    from tqdm.auto import tqdm

    from diffalign.data.transforms import UnusableImage, decode_image

    rows = []
    for e in entries:
        image = os.path.relpath(e["path"], rel_to) if rel_to else e["path"]
        rows.append({"model": model, **{k: v for k, v in e.items() if k != "path"}, "image": image, "scores": {}})
    if not scorers:
        return rows
    if not rows:
        raise UnreadableImages(f"{model}: no images to score")
    bad: list[dict] = []
    kept: list[dict] = []
    bar = tqdm(total=len(rows), desc=f"score {model}", unit="img", disable=not progress)
    for i in range(0, len(rows), batch_size):
        readable = []  # (row, image, prompt)
        for e, r in zip(entries[i : i + batch_size], rows[i : i + batch_size], strict=True):
            try:
                readable.append((r, decode_image(e["path"]), e["prompt"]))
            except UnusableImage as err:
                _log.warning("skipping %s: %s", e["path"], err)
                bad.append({"path": str(e["path"]), "reason": str(err)})
        if readable:
            images, prompts = [x[1] for x in readable], [x[2] for x in readable]
            for name, scorer in scorers.items():
                values = scorer.score(images, prompts)
                for (r, _, _), v in zip(readable, values.tolist(), strict=True):
                    r["scores"][name] = float(v)
            kept += [x[0] for x in readable]
        bar.update(len(rows[i : i + batch_size]))
    bar.close()
    if not kept:
        raise UnreadableImages(
            f"{model}: none of the {len(rows)} image files could be read (e.g. {bad[0]['path']}: {bad[0]['reason']})"
        )
    if bad:
        _log.warning("%s: skipped %d of %d image files that could not be read", model, len(bad), len(rows))
    if skipped is not None:
        skipped.extend(bad)
    return kept


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


# ----------------------------------------------------------------------------------------- statistics


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "sem": std / math.sqrt(n), "n": n}


def summarize_scores(rows: list[dict]) -> dict:
    """Per scorer: mean, sample std, standard error and count over images, and the mean per group."""
    names = sorted({k for r in rows for k in r["scores"]})
    out = {}
    for name in names:
        vals = [r["scores"][name] for r in rows if name in r["scores"]]
        entry = _stats(vals)
        groups: dict[str, list[float]] = {}
        for r in rows:
            if name in r["scores"] and r.get("group") is not None:
                groups.setdefault(str(r["group"]), []).append(r["scores"][name])
        if len(groups) > 1:
            entry["groups"] = {g: sum(v) / len(v) for g, v in groups.items()}
        out[name] = entry
    return out


def per_prompt_means(rows: list[dict], name: str) -> dict[int, float]:
    acc: dict[int, list[float]] = {}
    for r in rows:
        if name in r["scores"]:
            acc.setdefault(r["index"], []).append(r["scores"][name])
    return {i: sum(v) / len(v) for i, v in acc.items()}


def win_rates(rows_a: list[dict], rows_b: list[dict], higher_is_better: dict[str, bool] | None = None) -> dict:
    """Per scorer, over the prompts both models have: the fraction where A's mean score beats B's
    (ties count half), its 95% Wilson interval (ci_low, ci_high), and the raw win/tie/loss counts."""
    from diffalign.evaluation.stats import wilson_interval

    higher_is_better = higher_is_better or {}
    names = sorted({k for r in rows_a for k in r["scores"]} & {k for r in rows_b for k in r["scores"]})
    out = {}
    for name in names:
        a, b = per_prompt_means(rows_a, name), per_prompt_means(rows_b, name)
        common = sorted(set(a) & set(b))
        sign = 1 if higher_is_better.get(name, True) else -1
        wins = sum(1 for i in common if sign * (a[i] - b[i]) > 0)
        ties = sum(1 for i in common if a[i] == b[i])
        n = len(common)
        ci_low, ci_high = wilson_interval(wins + 0.5 * ties, n)
        out[name] = {
            "win_rate": (wins + 0.5 * ties) / n if n else float("nan"),
            "ci_low": ci_low,
            "ci_high": ci_high,
            "wins": wins,
            "ties": ties,
            "losses": n - wins - ties,
            "prompts": n,
        }
    return out


# ----------------------------------------------------------------------------------------- the whole run


@dataclass
class ModelRun:
    label: str
    generator: Callable[[list[str], list[int]], list[Image.Image]]
    description: str = ""
    rows: list[dict] = field(default_factory=list)
    geneval: dict | None = None
    generation: dict | None = None


def run_eval(
    suite: Suite,
    models: list[ModelRun],
    scorers: dict,
    out_dir: str | Path,
    limit: int | None = None,
    settings: dict | None = None,
    geneval: Callable[[Path], tuple[list[dict], str]] | None = None,
    gen_batch_size: int = 8,
    score_batch_size: int = 16,
    progress: bool = True,
    report: bool = True,
) -> dict:
    """Generate (resumable) and score every model on the suite; write results, summary and report.

    `geneval(image_dir) -> (results rows, detector description)` runs the GenEval rules when the suite asks
    for them. Returns the summary dict (also written to summary.json)."""
    from diffalign.evaluation import report as report_mod
    from diffalign.evaluation.geneval import summarize as geneval_summary
    from diffalign.evaluation.geneval import write_results

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = suite.load_prompts(limit)
    indices = {it.index for it in items}
    higher = {name: getattr(s, "higher_is_better", True) for name, s in scorers.items()}
    binary = [name for name, s in scorers.items() if getattr(s, "binary", False)]
    summary: dict = {
        "suite": suite.name,
        "suite_path": suite.path,
        "prompts": len(items),
        "images_per_prompt": suite.images_per_prompt,
        "settings": settings or {},
        "models": {},
        "anchors": suite.anchors,
    }
    for m in models:
        mdir = out_dir / m.label
        m.generation = generate_images(
            m.generator, suite, items, mdir / "images", {**(settings or {}), "model": m.description or m.label},
            batch_size=gen_batch_size, progress=progress,
        )  # fmt: skip
        entries = layout_entries(mdir / "images", seed_fn=suite.seed_for, indices=indices)
        skipped: list[dict] = []
        m.rows = score_entries(entries, scorers, m.label, score_batch_size, progress, rel_to=out_dir, skipped=skipped)
        write_jsonl(m.rows, mdir / "scores.jsonl")
        entry = {"description": m.description, "generation": m.generation, "scores": summarize_scores(m.rows)}
        if skipped:
            entry["skipped"] = skipped
        if "geneval" in suite.metrics and geneval is not None:
            results, detector_note = geneval(mdir / "images")
            results = [r for r in results if int(Path(r["filename"]).parent.parent.name) in indices]
            write_results(results, mdir / "geneval_results.jsonl")
            entry["geneval"] = {**geneval_summary(results).to_dict(), "detector": detector_note}
            m.geneval = entry["geneval"]
        summary["models"][m.label] = entry
    if len(models) == 2:
        a, b = models
        summary["comparison"] = {"a": a.label, "b": b.label, "win_rates": win_rates(a.rows, b.rows, higher),
                                 "mcnemar": mcnemar_by_scorer(a.rows, b.rows, binary)}
        write_jsonl(comparison_rows(a, b), out_dir / "comparison.jsonl")
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    write_atomic(out_dir / "summary.md", report_mod.summary_markdown(summary))
    if report:
        report_mod.write_html_report(summary, {m.label: m.rows for m in models}, out_dir)
    return summary


def mcnemar_by_scorer(rows_a: list[dict], rows_b: list[dict], names: Sequence[str]) -> dict:
    """Exact McNemar tests (diffalign.evaluation.stats) for the binary (pass / fail) scorers `names`."""
    from diffalign.evaluation.stats import paired_mcnemar

    return {n: t for n in sorted(names) if (t := paired_mcnemar(rows_a, rows_b, n)) is not None}


def comparison_rows(a: ModelRun, b: ModelRun) -> list[dict]:
    names = sorted({k for r in a.rows for k in r["scores"]})
    means = {(m.label, n): per_prompt_means(m.rows, n) for m in (a, b) for n in names}
    prompts = {r["index"]: r["prompt"] for r in a.rows}
    out = []
    for i in sorted(prompts):
        row = {"index": i, "prompt": prompts[i]}
        for n in names:
            va, vb = means[(a.label, n)].get(i), means[(b.label, n)].get(i)
            row[n] = {a.label: va, b.label: vb}
        out.append(row)
    return out
