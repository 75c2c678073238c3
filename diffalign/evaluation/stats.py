"""Paired tests between two models evaluated on the same prompts and seeds.

McNemar's exact test on a per-image binary outcome (e.g. "the image follows its prompt"): images are
paired by (prompt index, sample), so both models start from the same initial noise. With
    b = pairs where A is right and B wrong,   c = pairs where B is right and A wrong,
only the discordant pairs carry information; under H0 (equal accuracy) b ~ Binomial(b + c, 1/2), and
the two-sided p-value is the exact binomial one (scipy.stats.binomtest). b + c = 0 gives p = 1.

Proportions (a pass rate, a win rate) get a Wilson score interval (`wilson_interval`).
"""

from __future__ import annotations

from collections.abc import Sequence


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (A only right), c (B only right)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (the one scipy's
    `binomtest(k, n).proportion_ci(method="wilson")` gives for integer k). `successes` may be fractional,
    e.g. a win count with ties counted half: outcomes in {0, 1/2, 1} have at most the binomial variance,
    so the interval is then conservative. n = 0 gives (nan, nan)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_table(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Paired binary outcomes of two models on the same items -> counts, accuracies and the p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    n = len(a)
    return {
        "n": n,
        "a_mean": sum(map(bool, a)) / n if n else float("nan"),
        "b_mean": sum(map(bool, b)) / n if n else float("nan"),
        "both": both,
        "a_only": a_only,
        "b_only": b_only,
        "neither": n - both - a_only - b_only,
        "p_value": mcnemar_exact(a_only, b_only),
    }


def is_binary(rows: list[dict], name: str) -> bool:
    vals = [r["scores"][name] for r in rows if name in r["scores"]]
    return bool(vals) and all(v in (0.0, 1.0) for v in vals)


def paired_mcnemar(rows_a: list[dict], rows_b: list[dict], name: str) -> dict | None:
    """McNemar of scorer `name` between two models' result rows (runner.score_entries), paired by
    (index, sample). None when the scorer is not binary (0/1) on both sides or nothing pairs up."""
    if not (is_binary(rows_a, name) and is_binary(rows_b, name)):
        return None
    a = {(r["index"], r["sample"]): r["scores"][name] for r in rows_a if name in r["scores"]}
    b = {(r["index"], r["sample"]): r["scores"][name] for r in rows_b if name in r["scores"]}
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    return mcnemar_table([a[k] == 1.0 for k in keys], [b[k] == 1.0 for k in keys])
