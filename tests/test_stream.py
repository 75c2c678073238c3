"""data.streaming: parquet read as a stream of row groups (diffalign/data/stream.py), here from an fsspec
`memory://` filesystem standing in for hf:// / s3://. The stream gives the same items as the in-memory
(save_to_disk) dataset, reads each row group once per epoch, and a resumed stream neither repeats nor skips."""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.data import DataConfig, build_preference_dataset, collate_preference
from diffalign.data.synthetic import make_table
from diffalign.training.trainer import GlobalBatchSampler, _EpochIndexed
from tests.data_helpers import builtin_cache  # noqa: F401
from tests.helpers import assert_states_close, crash_then_resume, run, tiny_config, trainable_state

ROWS, GROUP, FILES = 40, 4, 2  # 10 row groups over 2 files; every 10th row is a tie (dropped): 36 items


@pytest.fixture
def remote(tmp_path):
    """The builtin Pick-a-Pic table as 2 parquet shards of 4-row groups at memory://, and as an in-memory
    `datasets` save_to_disk copy (a different reader of the same rows)."""
    import datasets

    table = make_table("pickapic", ROWS, 0)
    fs = fsspec.filesystem("memory")
    half = ROWS // FILES
    for i in range(FILES):
        with fs.open(f"/pickapic/train-{i:05d}-of-{FILES:05d}.parquet", "wb") as fh:
            pq.write_table(table.slice(i * half, half), fh, row_group_size=GROUP)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "disk"))
    yield "memory://pickapic", str(tmp_path / "disk")
    fs.rm("/pickapic", recursive=True)


def dataset(source: str, streaming: bool):
    return build_preference_dataset(DataConfig(format="pickapic", source=source, resolution=16, streaming=streaming,
                                               random_crop=True, caption_dropout=0.3), seed=3)  # fmt: skip


def batches(ds, start: int, count: int, rank: int = 0, world: int = 2, batch: int = 2):
    """The batches rank `rank` reads from micro-step `start` on, through the trainer's sampler and loader."""
    from diffalign.data.stream import stream_order

    order = stream_order(ds, 3) if ds.cfg.streaming else None
    sampler = GlobalBatchSampler(len(ds), batch, world, rank, 3, start=start, order=order)
    loader = torch.utils.data.DataLoader(_EpochIndexed(ds), batch_sampler=sampler, collate_fn=collate_preference)
    it = iter(loader)
    return [next(it) for _ in range(count)]


def row_of(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


def test_stream_reads_each_row_group_once_per_epoch_and_gives_the_in_memory_items(remote):
    from diffalign.data.stream import stream_order

    url, disk = remote
    stream, memory = dataset(url, True), dataset(disk, False)
    assert len(stream) == len(memory) == 36 and stream.stats["ties"] == 4
    per_epoch = len(stream) // 4  # global batch 2 x 2 ranks: 9 batches, no tail
    order = stream_order(stream, 3)
    for epoch in (0, 1):
        memory.set_epoch(epoch)
        perm = order(epoch)
        rows = []
        for r in (0, 1):
            stream.src._cache.clear()  # each rank is its own process with its own reader
            stream.src.reads = 0
            got = batches(stream, epoch * per_epoch, per_epoch, rank=r)
            mine = [row_of(k) for b in got for k in b["keys"]]
            assert stream.src.reads == len({row // GROUP for row in mine})  # each group it needs read once
            rows += mine
            # the in-memory dataset at the indices the stream's sampler chose: the same tensors and captions
            for m, b in enumerate(got):
                want = collate_preference([memory[int(i)] for i in perm[m * 4 + r * 2: m * 4 + r * 2 + 2]])
                assert [row_of(k) for k in b["keys"]] == [row_of(k) for k in want["keys"]]
                assert b["captions"] == want["captions"] and torch.equal(b["phi"], want["phi"])
                assert torch.equal(b["pixel_values"], want["pixel_values"])
        assert sorted(rows) == sorted(int(r) for r in memory.rows)  # every item once, none repeated
        ordered = [int(memory.rows[int(i)]) // GROUP for i in perm]
        runs = [g for i, g in enumerate(ordered) if i == 0 or g != ordered[i - 1]]
        assert len(runs) == len(set(runs)) == 10  # a group's items come one after another
    assert not torch.equal(order(0), order(1))  # each epoch its own order


def test_a_resumed_stream_neither_repeats_nor_skips(remote):
    """A run resumed at micro-step k builds its sampler at k: for each rank it continues exactly where the
    uninterrupted stream was, across an epoch boundary."""
    url, _ = remote
    stream = dataset(url, True)
    for k in (4, 9, 11):  # mid-epoch, at the boundary, in epoch 1
        for rank in (0, 1):
            whole = batches(stream, 0, 14, rank=rank)
            resumed = batches(stream, 0, k, rank=rank) + batches(stream, k, 14 - k, rank=rank)
            assert [b["keys"] for b in resumed] == [b["keys"] for b in whole]
            assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(resumed, whole))


def test_streamed_training_resumes_exactly(tmp_path, monkeypatch, remote):
    url, _ = remote
    common = dict(data={"source": url, "streaming": True, "builtin_rows": 24}, train={"max_steps": 3},
                  checkpoint={"every": 2})  # fmt: skip
    full = run(tiny_config(tmp_path / "full", **common))
    resumed = crash_then_resume(tiny_config(tmp_path / "crash", **common), 2, monkeypatch)
    assert full.sampler.order is not None and resumed.sampler.order is not None  # the stream's order
    assert_states_close(trainable_state(full), trainable_state(resumed), atol=1e-7, rtol=1e-6)


def test_streaming_refuses_a_source_that_is_not_parquet(remote):
    from diffalign.data.sources import DataFormatError
    from diffalign.data.stream import stream_order

    with pytest.raises(DataFormatError, match="not a parquet source"):
        stream_order(dataset(remote[1], True), 0)
