"""The summary (markdown, summary.md) and a self-contained HTML report (report.html: HTML tables, plots and
thumbnails embedded as base64). Both are built from the same tables, so they always say the same thing."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

#: thumbnails: larger images are shrunk to fit THUMB_MAX px; smaller ones are shown upscaled by an integer
#: factor to at least THUMB_MIN px, with `image-rendering: pixelated` so their pixels stay sharp
THUMB_MAX = 256
THUMB_MIN = 128


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


@dataclass
class Table:
    """One table of the summary: an introducing sentence, the header row, the body, and notes after it."""

    intro: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def summary_tables(summary: dict) -> list[Table]:
    """The summary's tables: scores (mean ± sem), per-group means, GenEval, win rates (95% CI), McNemar."""
    models = summary["models"]
    scorers = sorted({s for m in models.values() for s in m["scores"]})
    out: list[Table] = []
    if scorers:
        rows = []
        for label, m in models.items():
            cells = []
            for s in scorers:
                e = m["scores"].get(s)
                cells.append(f"{e['mean']:.4f} ± {e['sem']:.4f}" if e else "-")
            n = max((e["n"] for e in m["scores"].values()), default=0)
            rows.append([label, *cells, str(n)])
        out.append(Table("", ["model", *(f"{s} (mean ± sem)" for s in scorers), "images"], rows))
        groups = sorted({g for m in models.values() for e in m["scores"].values() for g in e.get("groups", {})})
        if groups:
            rows = [[label, s, *(_fmt(e["groups"].get(g)) for g in groups)]
                    for label, m in models.items() for s, e in m["scores"].items() if "groups" in e]  # fmt: skip
            out.append(Table("Per group (mean):", ["model", "scorer", *groups], rows))
    ge = {label: m["geneval"] for label, m in models.items() if m.get("geneval")}
    if ge:
        tasks = list(next(iter(ge.values()))["tasks"])
        rows = [[label, f"{g['overall']:.3f}", *(_fmt(g["tasks"].get(t, {}).get("accuracy"), 3) for t in tasks),
                 str(g["total_images"]), f"{g['correct_prompts']:.3f}"] for label, g in ge.items()]  # fmt: skip
        out.append(Table("GenEval (image accuracy per task; overall = mean over tasks):",
                         ["model", "overall", *tasks, "images", "correct prompts"], rows,
                         notes=sorted({g["detector"] for g in ge.values()})))  # fmt: skip
    comp = summary.get("comparison")
    if comp:
        rows = []
        for s, w in comp["win_rates"].items():
            ci = f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}]" if "ci_low" in w else "-"
            rows.append([s, f"{w['win_rate']:.3f}", ci, str(w["wins"]), str(w["ties"]), str(w["losses"]), str(w["prompts"])])
        out.append(Table(f"Per-prompt win rate of **{comp['a']}** over **{comp['b']}** (ties count half; "
                         "95% Wilson interval over prompts):",
                         ["scorer", "win rate", "95% CI", "wins", "ties", "losses", "prompts"], rows))  # fmt: skip
        if comp.get("mcnemar"):
            rows = [[s, f"{t['a_mean']:.3f}", f"{t['b_mean']:.3f}", str(t["a_only"]), str(t["b_only"]), str(t["n"]),
                     f"{t['p_value']:.2g}"] for s, t in comp["mcnemar"].items()]  # fmt: skip
            out.append(Table(f"Paired exact McNemar test, **{comp['a']}** vs **{comp['b']}** on the same prompts "
                             "and seeds (binary scorers; a only / b only = images only that model gets right):",
                             ["scorer", comp["a"], comp["b"], "a only", "b only", "pairs", "p-value"], rows))  # fmt: skip
    return out


def _header_lines(summary: dict) -> list[str]:
    lines = [f"{summary['prompts']} prompts x {summary['images_per_prompt']} images per prompt."]
    st = summary.get("settings") or {}
    if st:
        lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(st.items()) if k != "model") + ".")
    for label, m in summary["models"].items():
        if m.get("skipped"):
            lines.append(f"{label}: skipped {len(m['skipped'])} image file(s) that could not be read, e.g. "
                         f"{m['skipped'][0]['path']} ({m['skipped'][0]['reason']}).")  # fmt: skip
    return lines


def summary_markdown(summary: dict) -> str:
    lines = [f"# {summary['suite']}: evaluation summary", "", *_header_lines(summary), ""]
    for t in summary_tables(summary):
        if t.intro:
            lines += [t.intro, ""]
        lines.append("| " + " | ".join(t.headers) + " |")
        lines.append("|" + "---|" * len(t.headers))
        lines += ["| " + " | ".join(r) + " |" for r in t.rows]
        lines.append("")
        if t.notes:
            lines += [f"> {n}" for n in t.notes] + [""]
    if summary.get("anchors"):
        lines.append("Published anchors for this suite (sanity checks for real-weight runs; see the suite file):")
        lines += ["", "```", json.dumps(summary["anchors"], indent=1), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- HTML


def _html_table(t: Table) -> str:
    import pandas as pd

    frame = pd.DataFrame(t.rows, columns=t.headers)
    return frame.to_html(index=False, escape=True, border=0, classes="summary")


def _inline_md(text: str) -> str:
    """html-escaped text with the summary's **bold** markers as <b>."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _thumbnail(path: Path) -> tuple[str, str, int, int, bool]:
    """(mime, base64, display width, display height, pixelated) of an image file."""
    from PIL import Image

    from diffalign.data.transforms import decode_image

    img = decode_image(str(path))
    buf = io.BytesIO()
    side = max(img.size)
    if side < THUMB_MIN:  # tiny (e.g. 16 px toy images): keep every pixel, let the browser scale it up
        scale = -(-THUMB_MIN // side)
        img.save(buf, format="PNG")
        return "image/png", base64.b64encode(buf.getvalue()).decode(), img.width * scale, img.height * scale, True
    if side > THUMB_MAX:
        img.thumbnail((THUMB_MAX, THUMB_MAX), Image.LANCZOS)
    img.save(buf, format="JPEG", quality=90)
    return "image/jpeg", base64.b64encode(buf.getvalue()).decode(), img.width, img.height, False


def binary_scorers(rows_by_model: dict[str, list[dict]]) -> set[str]:
    """Scorers whose every value (over all models) is 0 or 1: a pass rate, shown as a rate, not a histogram."""
    from diffalign.evaluation.stats import is_binary

    rows = [r for rs in rows_by_model.values() for r in rs]
    return {s for s in {k for r in rows for k in r["scores"]} if is_binary(rows, s)}


def _plots(summary: dict, rows_by_model: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """(title, kind, base64 png): per scorer "rate" (binary: pass rate with its 95% Wilson interval) or
    "mean+histogram" (mean ± sem and the distribution over images); then "win rates" and "GenEval"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffalign.evaluation.stats import wilson_interval

    out = []
    labels = list(rows_by_model)
    colours = [f"C{i}" for i in range(len(labels))]
    scorers = sorted({s for m in summary["models"].values() for s in m["scores"]})
    binary = binary_scorers(rows_by_model)
    for s in scorers:
        stats = [summary["models"][m]["scores"].get(s, {}) for m in labels]
        means = [e.get("mean", float("nan")) for e in stats]
        if s in binary:
            fig, ax = plt.subplots(figsize=(4.5, 3))
            cis = [wilson_interval(round(e["mean"] * e["n"]), e["n"]) if e else (float("nan"),) * 2 for e in stats]
            err = [[m - lo for m, (lo, _) in zip(means, cis)], [hi - m for m, (_, hi) in zip(means, cis)]]
            ax.bar(range(len(labels)), means, yerr=err, capsize=4, color=colours)
            ax.set_ylim(0, 1)
            ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
            ax.set_title(f"{s}: rate (95% Wilson interval)")
            out.append((s, "rate", _png_b64(fig)))
            plt.close(fig)
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
        sems = [e.get("sem", 0.0) for e in stats]
        ax1.bar(range(len(labels)), means, yerr=sems, capsize=4, color=colours)
        ax1.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        ax1.set_title(f"{s}: mean ± sem")
        per_model = [[r["scores"][s] for r in rows_by_model[m] if s in r["scores"]] for m in labels]
        everything = [v for vals in per_model for v in vals]
        lo, hi = (min(everything), max(everything)) if everything else (0.0, 1.0)
        bins = [lo + (hi - lo) * j / 20 for j in range(21)] if hi > lo else 20  # shared bins across models
        for m, vals, c in zip(labels, per_model, colours, strict=True):
            ax2.hist(vals, bins=bins, alpha=0.5, label=m, color=c)
        ax2.set_title(f"{s}: distribution over images")
        ax2.legend(fontsize=7)
        out.append((s, "mean+histogram", _png_b64(fig)))
        plt.close(fig)
    comp = summary.get("comparison")
    if comp and comp["win_rates"]:
        fig, ax = plt.subplots(figsize=(5, 3))
        names = list(comp["win_rates"])
        w = [comp["win_rates"][n] for n in names]
        rates = [x["win_rate"] for x in w]
        err = [[r - x.get("ci_low", r) for r, x in zip(rates, w)], [x.get("ci_high", r) - r for r, x in zip(rates, w)]]
        ax.bar(range(len(names)), rates, yerr=err, capsize=4, color="C2")
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"win rate of {comp['a']} over {comp['b']} (95% CI)", fontsize=9)
        out.append(("win rates", "win rates", _png_b64(fig)))
        plt.close(fig)
    ge = {m: e["geneval"] for m, e in summary["models"].items() if e.get("geneval")}
    if ge:
        fig, ax = plt.subplots(figsize=(8, 3))
        tasks = list(next(iter(ge.values()))["tasks"]) + ["overall"]
        width = 0.8 / len(ge)
        for i, (m, g) in enumerate(ge.items()):
            vals = [g["tasks"].get(t, {}).get("accuracy", 0.0) for t in tasks[:-1]] + [g["overall"]]
            ax.bar([x + i * width for x in range(len(tasks))], vals, width=width, label=m, color=f"C{i}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("GenEval accuracy")
        out.append(("GenEval", "GenEval", _png_b64(fig)))
        plt.close(fig)
    return out


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "table.summary{border-collapse:collapse;margin:0.5em 0 1em}"
    "table.summary td,table.summary th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}"
    "table.summary td:first-child,table.summary th{text-align:left}"
    "figure{display:inline-block;margin:4px;text-align:center;font-size:12px;vertical-align:top}"
    "figure img{display:block;margin:auto}"
    "img.pixelated{image-rendering:pixelated}"  # tiny images upscaled without blurring
    ".prompt{margin-top:1em;font-weight:bold}.note{background:#fff3cd;padding:6px}"
)


def write_html_report(
    summary: dict, rows_by_model: dict[str, list[dict]], out_dir: str | Path, max_prompts: int = 12
) -> Path:
    """report.html in out_dir: the summary as HTML tables, per-scorer plots (a rate with its 95% interval
    for binary scorers; mean ± sem and a histogram otherwise), win rates with 95% intervals, and an image
    grid (the first `max_prompts` prompts, every model side by side, with each image's scores)."""
    out_dir = Path(out_dir)
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>diffalign eval: {esc(str(summary['suite']))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(str(summary['suite']))}</h1>",
        "<h2>Summary</h2>",
    ]
    parts += [f"<p>{esc(line)}</p>" for line in _header_lines(summary)]
    for t in summary_tables(summary):
        if t.intro:
            parts.append(f"<p>{_inline_md(t.intro)}</p>")
        parts.append(_html_table(t))
        parts += [f"<p class='note'>{esc(n)}</p>" for n in t.notes]
    if summary.get("anchors"):
        parts.append("<p>Published anchors for this suite (sanity checks for real-weight runs; see the suite file):</p>")
        parts.append(f"<pre>{esc(json.dumps(summary['anchors'], indent=1))}</pre>")
    plots = _plots(summary, rows_by_model)
    if plots:
        parts.append("<h2>Scores</h2>")
        for title, kind, b64 in plots:
            parts.append(f"<h3>{esc(title)}</h3><img class='plot' data-scorer='{esc(title)}' data-kind='{esc(kind)}' "
                         f"alt='{esc(title)}: {esc(kind)}' src='data:image/png;base64,{b64}'>")  # fmt: skip
    parts.append("<h2>Images</h2>")
    by_prompt: dict[int, dict[str, list[dict]]] = {}
    for label, rows in rows_by_model.items():
        for r in rows:
            by_prompt.setdefault(r["index"], {}).setdefault(label, []).append(r)
    for idx in sorted(by_prompt)[:max_prompts]:
        entry = by_prompt[idx]
        prompt = next(iter(entry.values()))[0]["prompt"]
        parts.append(f"<div class='prompt'>{idx:05d}: {esc(prompt)}</div>")
        for label, rows in entry.items():
            parts.append(f"<div>{esc(label)}<br>")
            for r in sorted(rows, key=lambda r: r["sample"]):
                path = out_dir / r["image"] if not Path(r["image"]).is_absolute() else Path(r["image"])
                mime, b64, w, h, pixelated = _thumbnail(path)
                caption = ", ".join(f"{k}={v:.3f}" for k, v in r["scores"].items())
                cls = " class='thumb pixelated'" if pixelated else " class='thumb'"
                parts.append(
                    f"<figure><img{cls} width='{w}' height='{h}' alt='#{r['sample']}' src='data:{mime};base64,{b64}'>"
                    f"<figcaption>#{r['sample']} {esc(caption)}</figcaption></figure>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
