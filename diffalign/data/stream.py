"""`data.streaming`: the data read as a stream of parquet row groups, for sets too large to copy or to read
in random order (Pick-a-Pic v2 is about 335 GB), local or at an fsspec URL (hf://datasets/..., s3://, ...).

The determinism contract is the in-memory one (diffalign/training/trainer.py, GlobalBatchSampler): global
batch m holds positions [m*G, (m+1)*G) of epoch e's order, each rank its slice, every random draw a
function of (seed, epoch, item). Only the order differs: the full random permutation becomes one that a
stream can follow. Each epoch visits the row groups in a random order drawn from (seed, epoch) and the
items of one group one after another, in a random order drawn from (seed, epoch, group). A process then
reads each row group once per epoch (ParquetSource keeps the group it is reading), and a resumed run
starts at its position in the stream: nothing repeated, nothing skipped.

Building the dataset still reads the light columns (labels / phi) of every row group, a few bytes per row,
to choose the usable items: the same items, with the same indices, as without streaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.data.sources import DataFormatError, ParquetSource


def row_group_order(groups: Sequence[int], seed: int, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s order of items 0..n-1, item i lying in row group groups[i]: the groups in a random
    order drawn from (seed, epoch), the items of each group together, in a random order drawn from
    (seed, epoch, group)."""
    groups = np.asarray(groups, dtype=np.int64)
    by_group = np.argsort(groups, kind="stable")
    ids, starts = np.unique(groups[by_group], return_index=True)
    members = np.split(by_group, starts[1:])
    out = []
    for k in np.random.default_rng([seed, epoch]).permutation(len(ids)):
        out.append(np.random.default_rng([seed, epoch, int(ids[k])]).permutation(members[k]))
    return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, dtype=torch.int64)


def stream_order(dataset, seed: int):
    """The `order(epoch)` GlobalBatchSampler follows for a streamed PreferenceDataset."""
    src = getattr(dataset, "src", None)
    if not isinstance(src, ParquetSource):
        what = getattr(src, "description", type(dataset).__name__)
        raise DataFormatError(f"data.streaming reads parquet row groups, but {what} is not a parquet source; "
                              "use parquet files (local or an hf:// / s3:// URL) or set data.streaming: false")  # fmt: skip
    groups = src.row_group_of(dataset.rows)
    return lambda epoch: row_group_order(groups, seed, epoch)
