"""Pick-a-Pic / Pick-Double-Caption items: winner first, ties, joint flip, dropout, determinism, collate."""

import pytest
import torch
from data_helpers import builtin_cache, half, jpeg, mean_rgb, pickapic_table, solid, write  # noqa: F401

from diffalign.data import DataConfig, build_preference_dataset, collate_preference

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _pair_file(tmp_path, labels, double_caption=False, sizes=((64, 48), (64, 48))):
    rows = [
        {"caption": f"p{i}", "jpg_0": jpeg(solid(RED, sizes[0])), "jpg_1": jpeg(solid(BLUE, sizes[1])),
         "label_0": lab, "caption_0": f"red {i}", "caption_1": f"blue {i}"}
        for i, lab in enumerate(labels)
    ]  # fmt: skip
    return write(pickapic_table(rows, double_caption=double_caption), tmp_path / "pairs.parquet")


def _cfg(path, **kw):
    kw.setdefault("resolution", 16)
    kw.setdefault("random_flip", False)
    return DataConfig(format=kw.pop("format", "pickapic"), source=str(path), **kw)


def test_winner_first_swaps_when_label_0_is_0(tmp_path):
    ds = build_preference_dataset(_cfg(_pair_file(tmp_path, [1.0, 0.0])))
    a, b = ds[0], ds[1]
    assert mean_rgb(a["pixel_values"][0])[0] > 240 and mean_rgb(a["pixel_values"][1])[2] > 240  # red wins
    assert mean_rgb(b["pixel_values"][0])[2] > 240 and mean_rgb(b["pixel_values"][1])[0] > 240  # blue wins
    assert a["phi"].tolist() == [1.0, 0.0] and b["phi"].dtype == torch.float32
    assert a["captions"] == ["p0", "p0"]


def test_double_caption_swaps_captions_with_images(tmp_path):
    ds = build_preference_dataset(
        _cfg(_pair_file(tmp_path, [1.0, 0.0], double_caption=True), format="double_caption")
    )
    assert ds[0]["captions"] == ["red 0", "blue 0"]
    swapped = ds[1]
    assert swapped["captions"] == ["blue 1", "red 1"]
    assert mean_rgb(swapped["pixel_values"][0])[2] > 240  # the blue image comes first with its caption


def test_ties_dropped_and_counted_or_kept(tmp_path):
    path = _pair_file(tmp_path, [1.0, 0.5, 0.0, 0.5])
    ds = build_preference_dataset(_cfg(path))
    assert len(ds) == 2 and ds.stats["ties"] == 2 and ds.stats["rows_read"] == 4
    assert "ties 2" in ds.describe()
    kept = build_preference_dataset(_cfg(path, drop_ties=False))
    assert len(kept) == 4 and kept[1]["phi"].tolist() == [0.5, 0.5]
    assert mean_rgb(kept[1]["pixel_values"][0])[0] > 240  # a kept tie is not reordered


def test_loser_resized_to_winner_size_in_the_dataset(tmp_path):
    path = _pair_file(tmp_path, [0.0], sizes=((40, 40), (96, 64)))  # the winner is jpg_1: 96x64
    item = build_preference_dataset(_cfg(path, resolution=32))[0]
    assert item["original_size"].tolist() == [[64, 96], [64, 96]]
    assert item["crop_top_left"].tolist() == [[0, 8], [0, 8]]  # 32x48 after resize, centre crop


def test_joint_flip_in_the_dataset(tmp_path):
    rows = [{"caption": "c", "jpg_0": jpeg(half((48, 48))), "jpg_1": jpeg(half((32, 32), (255, 0, 0), (0, 0, 255))),
             "label_0": 1.0}] * 40  # fmt: skip
    ds = build_preference_dataset(_cfg(write(pickapic_table(rows), tmp_path / "f.parquet"), random_flip=True))
    flips = []
    for i in range(len(ds)):
        px = ds[i]["pixel_values"]
        w_flipped = mean_rgb(px[0][:, :, :4])[0] > 128  # white on the left
        l_flipped = mean_rgb(px[1][:, :, :4])[2] > 128  # blue on the left
        assert w_flipped == l_flipped, f"item {i}: candidates flipped independently"
        flips.append(w_flipped)
    assert 5 < sum(flips) < 35  # both outcomes occur


def test_caption_dropout_rate_joint_and_deterministic():
    cfg = DataConfig(format="double_caption", source="builtin:double_caption", resolution=16, caption_dropout=0.3,
                     builtin_rows=40)  # fmt: skip
    ds = build_preference_dataset(cfg, seed=1)
    dropped = 0
    total = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            caps = ds[i]["captions"]
            assert caps in (["", ""],) or all(caps), "captions must be dropped jointly"
            dropped += caps == ["", ""]
            total += 1
    assert 0.15 < dropped / total < 0.45
    ds.set_epoch(1)
    again = build_preference_dataset(cfg, seed=1)
    again.set_epoch(1)
    assert [ds[i]["captions"] for i in range(10)] == [again[i]["captions"] for i in range(10)]
    none = build_preference_dataset(cfg.model_copy(update={"caption_dropout": 0.0}))
    assert all(all(none[i]["captions"]) for i in range(len(none)))


def test_determinism_per_seed_epoch_index():
    cfg = DataConfig(
        format="pickapic", source="builtin:pickapic", resolution=16, random_crop=True, builtin_rows=20
    )
    a, b = build_preference_dataset(cfg, seed=5), build_preference_dataset(cfg, seed=5)
    b.set_epoch(2)
    a.set_epoch(2)
    for i in (0, 3, 7):
        x, y = a[i], b[i]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(
            x["crop_top_left"], y["crop_top_left"]
        )
        assert x["key"] == y["key"]

    def draws(ds):
        return [(ds[i]["crop_top_left"].tolist(), ds[i]["pixel_values"].sum().item()) for i in range(len(ds))]

    e2 = draws(a)
    a.set_epoch(3)
    assert draws(a) != e2  # a new epoch re-draws crop/flip
    other = build_preference_dataset(cfg, seed=6)
    other.set_epoch(2)
    assert draws(other) != e2
    a.set_epoch(2)
    assert draws(a) == e2  # going back to an epoch reproduces it (resume)


def test_collate_stacks_and_drops_none():
    ds = build_preference_dataset(
        DataConfig(format="ranked", source="builtin:ranked", resolution=16, builtin_rows=6)
    )
    batch = collate_preference([ds[0], None, ds[1]])
    assert batch["pixel_values"].shape == (2, 4, 3, 16, 16)
    assert batch["phi"].shape == (2, 4) and batch["original_size"].shape == (2, 4, 2)
    assert (
        batch["crop_top_left"].dtype == torch.int64
        and len(batch["captions"]) == 2
        and len(batch["captions"][0]) == 4
    )
    assert batch["keys"] == [ds.key(0), ds.key(1)] and batch["skipped"] == 1
    assert (batch["phi"][:, :-1] >= batch["phi"][:, 1:]).all()  # best first
    assert collate_preference([None, None]) is None
    pair = build_preference_dataset(
        DataConfig(format="pickapic", source="builtin:pickapic", resolution=16, builtin_rows=4)
    )
    with pytest.raises(ValueError, match="different numbers of candidates"):
        collate_preference([ds[0], pair[0]])


def test_dataloader_workers_see_the_same_items():
    from torch.utils.data import DataLoader

    cfg = DataConfig(
        format="pickapic", source="builtin:pickapic", resolution=16, random_crop=True, builtin_rows=12
    )
    ds = build_preference_dataset(cfg, seed=2)
    ds.set_epoch(1)
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate_preference)
    first = next(iter(loader))
    local = collate_preference([ds[i] for i in range(4)])
    assert torch.equal(first["pixel_values"], local["pixel_values"]) and first["keys"] == local["keys"]


def test_joint_first_geometry_takes_jpg_0s_frame_as_the_diffusers_sdxl_script_does(tmp_path):
    """The diffusers SDXL DPO script and MaPO resize jpg_1 to jpg_0's size and condition on jpg_0's size,
    whichever image won; the default (joint_winner) uses the winner's."""
    path = _pair_file(tmp_path, [0.0], sizes=((40, 40), (96, 64)))  # jpg_0 40x40 loses, jpg_1 96x64 wins
    item = build_preference_dataset(_cfg(path, resolution=32, pair_geometry="joint_first"))[0]
    assert item["original_size"].tolist() == [[40, 40], [40, 40]]
    assert item["crop_top_left"].tolist() == [[0, 0], [0, 0]]
    assert mean_rgb(item["pixel_values"][0])[2] > 240  # still winner (blue) first


def test_independent_geometry_crops_and_flips_each_image_on_its_own(tmp_path):
    """Salesforce train.py and the diffusers SD1.5 script transform each image separately."""
    rows = [{"caption": f"p{i}", "jpg_0": jpeg(half((64, 48))), "jpg_1": jpeg(half((96, 64))), "label_0": 1.0}
            for i in range(40)]  # fmt: skip
    path = write(pickapic_table(rows), tmp_path / "halves.parquet")
    ind = build_preference_dataset(_cfg(path, resolution=16, random_flip=True, pair_geometry="independent"))
    joint = build_preference_dataset(_cfg(path, resolution=16, random_flip=True))
    mixed = 0
    for i in range(len(ind)):
        a, b = ind[i], joint[i]
        assert a["original_size"].tolist() == [[48, 64], [64, 96]]  # each its own size
        assert a["crop_top_left"].tolist() == [[0, 2], [0, 4]]  # each its own centre crop (21 and 24 px wide)
        flipped = [bool(mean_rgb(p[:, :, :4])[0] > 128) for p in a["pixel_values"]]  # white on the left
        assert flipped[0] == bool(mean_rgb(b["pixel_values"][0][:, :, :4])[0] > 128)  # candidate 0: same draw
        mixed += flipped[0] != flipped[1]
    assert 5 < mixed < 35  # winner and loser flip independently
