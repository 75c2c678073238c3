"""The Syn-Pic soft preference phi and the ranks derived from it: the one implementation, used by the
data loader (phi derived from a ranked row's scores or rank) and by the Syn-Pic generator.

For one prompt with k images scored by n reward models:

    C_i   = sum over reward models r, over opponents j != i, of [R_r(x_i) > R_r(x_j)]
    phi_i = C_i / (n * (k - 1))                      in [0, 1]: the fraction of comparisons x_i wins

Wins are strict: two images with equal scores under a reward model give no credit to either (so a
reward model that ties everything adds nothing to anyone, and phi's of one prompt need not sum to
k/2). A NaN score never wins and is never beaten. Scores of a reward model whose lower values are better
are negated before comparing (`higher_is_better`).

rank_i = the number of images with a strictly larger phi: 0 = best, ties share the lower rank
("1224" competition ranking, zero-based). The way back, phi from a rank, is the same rule with the rank
as one lower-is-better scorer: phi_i = (number of images ranked strictly worse) / (k - 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def win_counts(scores: np.ndarray, higher_is_better: Sequence[bool] | None = None) -> np.ndarray:
    """C of each image: scores [n_scorers, k] (or [..., n_scorers, k]) -> int counts [..., k]."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim < 2:
        raise ValueError(f"scores must be [n_scorers, k], got shape {s.shape}")
    if higher_is_better is not None:
        sign = np.where(np.asarray(higher_is_better, dtype=bool), 1.0, -1.0)
        s = s * sign[:, None]
    wins = s[..., :, None] > s[..., None, :]  # [..., n, k (i), k (j)]: i beats j under scorer r
    return wins.sum(axis=(-3, -1))


def soft_preference(scores: np.ndarray, higher_is_better: Sequence[bool] | None = None) -> np.ndarray:
    """phi [..., k] = C / (n (k - 1)) from scores [..., n_scorers, k]."""
    s = np.asarray(scores, dtype=np.float64)
    n, k = s.shape[-2], s.shape[-1]
    if k < 2 or n < 1:
        raise ValueError(f"Syn-Pic needs k >= 2 images and n >= 1 scorers per prompt, got k={k}, n={n}")
    return win_counts(s, higher_is_better) / float(n * (k - 1))


def ranks_from_phi(phi: np.ndarray) -> np.ndarray:
    """rank [..., k]: number of images with strictly larger phi (0 = best; ties share the lower rank)."""
    p = np.asarray(phi, dtype=np.float64)
    return (p[..., None, :] > p[..., :, None]).sum(-1)


def phi_from_rank(rank: np.ndarray) -> np.ndarray:
    """phi [..., k] from rank [..., k] (0 = best): the fraction of the others ranked strictly worse."""
    r = np.asarray(rank, dtype=np.float64)
    return soft_preference(r[..., None, :], higher_is_better=[False])
