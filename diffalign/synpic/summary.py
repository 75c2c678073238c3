"""End-of-run summary of a Syn-Pic dataset: score distributions, scorer agreement, generator means.

Agreement between two scorers a and b, over all within-prompt image pairs (i, j):
- pairwise-order agreement: among pairs that neither scorer ties, the fraction ordered the same way;
- Kendall tau-b per prompt (scipy), averaged over prompts where it is defined (no constant scores).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffalign.atomic import write_atomic


def _stats(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"count": 0}
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return {
        "count": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "p05": float(q[0]),
        "median": float(q[1]),
        "p95": float(q[2]),
        "max": float(x.max()),
    }


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """a, b: [R, k] scores of the same images under two scorers."""
    from scipy.stats import kendalltau

    k = a.shape[1]
    i, j = np.triu_indices(k, 1)
    da, db = np.sign(a[:, i] - a[:, j]), np.sign(b[:, i] - b[:, j])
    both = (da != 0) & (db != 0)
    taus = []
    for ra, rb in zip(a, b, strict=True):
        if np.ptp(ra) > 0 and np.ptp(rb) > 0:
            t = kendalltau(ra, rb).statistic
            if np.isfinite(t):
                taus.append(t)
    return {
        "pairwise_order_agreement": float((da == db)[both].mean()) if both.any() else None,
        "untied_pairs": int(both.sum()),
        "kendall_tau_mean": float(np.mean(taus)) if taus else None,
        "prompts_with_tau": len(taus),
    }


def summarize(files: Sequence[str], scorer_names: Sequence[str]) -> dict:
    import pyarrow.parquet as pq

    if not files:
        return {"rows": 0, "scorers": {}, "agreement": {}, "generators": {}}
    tables = [pq.read_table(f, columns=["generators", "scores", "phi"]) for f in files]
    rows = sum(t.num_rows for t in tables)
    scores = {
        n: np.array([r for t in tables for r in t.column("scores").combine_chunks().field(n).to_pylist()])
        for n in scorer_names
    }
    phi = np.array([r for t in tables for r in t.column("phi").to_pylist()])
    gens = np.array([r for t in tables for r in t.column("generators").to_pylist()])
    summary: dict = {"rows": rows, "scorers": {}, "agreement": {}, "generators": {}}
    for n in scorer_names:
        summary["scorers"][n] = _stats(scores[n].ravel())
    for a, b in itertools.combinations(scorer_names, 2):
        summary["agreement"][f"{a} vs {b}"] = agreement(scores[a], scores[b])
    for g in dict.fromkeys(gens.ravel().tolist()):
        m = gens == g
        summary["generators"][g] = {"images": int(m.sum()), "mean_phi": float(phi[m].mean())} | {
            f"mean_{n}": float(scores[n][m].mean()) for n in scorer_names
        }
    summary["phi"] = _stats(phi.ravel())
    return summary


def to_markdown(summary: dict) -> str:
    lines = ["# Syn-Pic summary", ""]
    run = summary.get("run", {})
    if run:
        lines += [", ".join(f"{k}: {v}" for k, v in run.items()), ""]
    lines += [
        "## Scores per scorer",
        "",
        "| scorer | count | mean | std | min | p05 | median | p95 | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, s in summary["scorers"].items():
        if s.get("count"):
            lines.append(
                f"| {n} | {s['count']} | "
                + " | ".join(f"{s[c]:.4g}" for c in ("mean", "std", "min", "p05", "median", "p95", "max"))
                + " |"
            )
    if summary["agreement"]:
        lines += [
            "",
            "## Agreement between scorers",
            "",
            "| pair | pairwise-order agreement | untied pairs | mean Kendall tau-b |",
            "|---|---|---|---|",
        ]
        for pair, a in summary["agreement"].items():
            f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(
                f"| {pair} | {f(a['pairwise_order_agreement'])} | {a['untied_pairs']} | {f(a['kendall_tau_mean'])} |"
            )
    if summary["generators"]:
        names = list(summary["scorers"])
        lines += ["", "## Per generator", "", "| generator | images | mean phi | " + " | ".join(f"mean {n}" for n in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]  # fmt: skip
        for g, s in summary["generators"].items():
            lines.append(
                f"| {g} | {s['images']} | {s['mean_phi']:.3f} | "
                + " | ".join(f"{s[f'mean_{n}']:.4g}" for n in names)
                + " |"
            )
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, out: str | Path) -> str:
    out = Path(out)
    md = to_markdown(summary)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    write_atomic(out / "summary.md", md)
    return md
