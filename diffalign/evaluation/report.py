"""The summary table (markdown) and a self-contained HTML report (plots and thumbnails embedded as base64)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_markdown(summary: dict) -> str:
    models = summary["models"]
    scorers = sorted({s for m in models.values() for s in m["scores"]})
    lines = [f"# {summary['suite']}: evaluation summary", ""]
    lines.append(f"{summary['prompts']} prompts x {summary['images_per_prompt']} images per prompt.")
    st = summary.get("settings") or {}
    if st:
        lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(st.items()) if k != "model") + ".")
    lines.append("")
    if scorers:
        lines.append("| model | " + " | ".join(f"{s} (mean ± sem)" for s in scorers) + " | images |")
        lines.append("|---|" + "---|" * len(scorers) + "---|")
        for label, m in models.items():
            cells = []
            for s in scorers:
                e = m["scores"].get(s)
                cells.append(f"{e['mean']:.4f} ± {e['sem']:.4f}" if e else "-")
            n = max((e["n"] for e in m["scores"].values()), default=0)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
        groups = sorted({g for m in models.values() for e in m["scores"].values() for g in e.get("groups", {})})
        if groups:
            lines += ["Per group (mean):", ""]
            lines.append("| model | scorer | " + " | ".join(groups) + " |")
            lines.append("|---|---|" + "---|" * len(groups))
            for label, m in models.items():
                for s, e in m["scores"].items():
                    if "groups" in e:
                        lines.append(f"| {label} | {s} | " + " | ".join(_fmt(e["groups"].get(g)) for g in groups) + " |")
            lines.append("")
    ge = {label: m["geneval"] for label, m in models.items() if m.get("geneval")}
    if ge:
        tasks = list(next(iter(ge.values()))["tasks"])
        lines.append("GenEval (image accuracy per task; overall = mean over tasks):")
        lines.append("")
        lines.append("| model | overall | " + " | ".join(tasks) + " | images | correct prompts |")
        lines.append("|---|---|" + "---|" * len(tasks) + "---|---|")
        for label, g in ge.items():
            cells = " | ".join(_fmt(g["tasks"].get(t, {}).get("accuracy"), 3) for t in tasks)
            lines.append(f"| {label} | {g['overall']:.3f} | {cells} | {g['total_images']} | {g['correct_prompts']:.3f} |")
        lines.append("")
        for note in sorted({g["detector"] for g in ge.values()}):
            lines.append(f"> {note}")
        lines.append("")
    comp = summary.get("comparison")
    if comp:
        lines.append(f"Per-prompt win rate of **{comp['a']}** over **{comp['b']}** (ties count half):")
        lines.append("")
        lines.append("| scorer | win rate | wins | ties | losses | prompts |")
        lines.append("|---|---|---|---|---|---|")
        for s, w in comp["win_rates"].items():
            lines.append(f"| {s} | {w['win_rate']:.3f} | {w['wins']} | {w['ties']} | {w['losses']} | {w['prompts']} |")
        lines.append("")
        if comp.get("mcnemar"):
            lines.append(f"Paired exact McNemar test, **{comp['a']}** vs **{comp['b']}** on the same prompts and seeds "
                         "(binary scorers; a only / b only = images only that model gets right):")
            lines.append("")
            lines.append(f"| scorer | {comp['a']} | {comp['b']} | a only | b only | pairs | p-value |")
            lines.append("|---|---|---|---|---|---|---|")
            for s, t in comp["mcnemar"].items():
                lines.append(f"| {s} | {t['a_mean']:.3f} | {t['b_mean']:.3f} | {t['a_only']} | {t['b_only']} | "
                             f"{t['n']} | {t['p_value']:.2g} |")
            lines.append("")
    if summary.get("anchors"):
        lines.append("Published anchors for this suite (sanity checks for real-weight runs; see the suite file):")
        lines.append("")
        lines.append("```")
        lines.append(json.dumps(summary["anchors"], indent=1))
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- HTML


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _thumb_b64(path: Path, size: int = 160) -> str:
    from diffalign.data.transforms import decode_image

    img = decode_image(str(path))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(summary: dict, rows_by_model: dict[str, list[dict]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    labels = list(rows_by_model)
    scorers = sorted({s for m in summary["models"].values() for s in m["scores"]})
    for s in scorers:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
        means = [summary["models"][m]["scores"].get(s, {}).get("mean", float("nan")) for m in labels]
        sems = [summary["models"][m]["scores"].get(s, {}).get("sem", 0.0) for m in labels]
        ax1.bar(range(len(labels)), means, yerr=sems, capsize=4, color=[f"C{i}" for i in range(len(labels))])
        ax1.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        ax1.set_title(f"{s}: mean ± sem")
        per_model = [[r["scores"][s] for r in rows_by_model[m] if s in r["scores"]] for m in labels]
        everything = [v for vals in per_model for v in vals]
        lo, hi = (min(everything), max(everything)) if everything else (0.0, 1.0)
        bins = [lo + (hi - lo) * j / 20 for j in range(21)] if hi > lo else 20  # shared bins across models
        for i, (m, vals) in enumerate(zip(labels, per_model, strict=True)):
            ax2.hist(vals, bins=bins, alpha=0.5, label=m, color=f"C{i}")
        ax2.set_title(f"{s}: distribution over images")
        ax2.legend(fontsize=7)
        out.append((s, _png_b64(fig)))
        plt.close(fig)
    comp = summary.get("comparison")
    if comp and comp["win_rates"]:
        fig, ax = plt.subplots(figsize=(5, 3))
        names = list(comp["win_rates"])
        ax.bar(range(len(names)), [comp["win_rates"][n]["win_rate"] for n in names], color="C2")
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"win rate of {comp['a']} over {comp['b']}", fontsize=9)
        out.append(("win rates", _png_b64(fig)))
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
        out.append(("GenEval", _png_b64(fig)))
        plt.close(fig)
    return out


def write_html_report(
    summary: dict, rows_by_model: dict[str, list[dict]], out_dir: str | Path, max_prompts: int = 12
) -> Path:
    """report.html in out_dir: the summary, per-scorer bar plots and histograms, and an image grid (the
    first `max_prompts` prompts, every model side by side, with each image's scores)."""
    out_dir = Path(out_dir)
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>diffalign eval: {esc(summary['suite'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}figure{display:inline-block;margin:4px;"
        "text-align:center;font-size:11px}.prompt{margin-top:1em;font-weight:bold}.note{background:#fff3cd;"
        "padding:6px}</style></head><body>",
        f"<h1>{esc(summary['suite'])}</h1>",
    ]
    parts.append("<h2>Summary</h2><pre>" + esc(summary_markdown(summary)) + "</pre>")
    for m in summary["models"].values():
        if m.get("geneval"):
            parts.append(f"<p class='note'>{esc(m['geneval']['detector'])}</p>")
            break
    plots = _plots(summary, rows_by_model)
    if plots:
        parts.append("<h2>Scores</h2>")
        for title, b64 in plots:
            parts.append(f"<h3>{esc(title)}</h3><img alt='{esc(title)}' src='data:image/png;base64,{b64}'>")
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
                caption = ", ".join(f"{k}={v:.3f}" for k, v in r["scores"].items())
                parts.append(
                    f"<figure><img src='data:image/jpeg;base64,{_thumb_b64(path)}'>"
                    f"<figcaption>#{r['sample']} {esc(caption)}</figcaption></figure>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
