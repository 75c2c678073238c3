"""Every source kind on local fixtures of the real schemas: parquet file / dir / glob, save_to_disk folder,
hub id (datasets.load_dataset monkeypatched), jsonl (pairs and ranked), HPDv2 json, builtin:*."""

import json

import datasets
import pyarrow.parquet as pq
import pytest
from data_helpers import builtin_cache, jpeg, mean_rgb, pickapic_table, ranked_table, solid, write  # noqa: F401

from diffalign.data import DataConfig, build_preference_dataset, schema
from diffalign.data.synthetic import builtin_source

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _rows(n, label=1.0):
    return [{"caption": f"c{i}", "jpg_0": jpeg(solid(RED, (32, 32))), "jpg_1": jpeg(solid(BLUE, (32, 32))), "label_0": label}
            for i in range(n)]  # fmt: skip


def _check_pairs(ds, n, winner_colour=0):
    assert len(ds) == n
    item = ds[n - 1]
    assert item["pixel_values"].shape == (2, 3, 16, 16)
    assert mean_rgb(item["pixel_values"][0])[winner_colour] > 240
    return item


def test_parquet_file_dir_and_glob(tmp_path):
    write(pickapic_table(_rows(3)), tmp_path / "one.parquet")
    _check_pairs(
        build_preference_dataset(
            DataConfig(format="pickapic", source=str(tmp_path / "one.parquet"), resolution=16)
        ),
        3,
    )
    # A hub-style mirror: data/<split>-xxxxx-of-xxxxx.parquet; the split picks the shards.
    d = tmp_path / "mirror" / "data"
    d.mkdir(parents=True)
    write(pickapic_table(_rows(3)), d / "train-00000-of-00002.parquet")
    write(pickapic_table(_rows(2)), d / "train-00001-of-00002.parquet")
    write(pickapic_table(_rows(4, label=0.0)), d / "validation-00000-of-00001.parquet")
    train = build_preference_dataset(
        DataConfig(format="pickapic", source=str(tmp_path / "mirror"), resolution=16)
    )
    _check_pairs(train, 5)
    assert len({train.key(i) for i in range(5)}) == 5
    val = build_preference_dataset(
        DataConfig(format="pickapic", source=str(tmp_path / "mirror"), split="validation", resolution=16)
    )
    _check_pairs(val, 4, winner_colour=2)
    glob_ds = build_preference_dataset(
        DataConfig(format="pickapic", source=str(d / "train-*.parquet"), resolution=16)
    )
    _check_pairs(glob_ds, 5)


def test_save_to_disk_folder_with_image_feature(tmp_path):
    # DCPO saves Pick-Double-Caption with save_to_disk; here the images use datasets' Image() feature.
    table = pickapic_table(_rows(3, label=0.0), double_caption=True)
    ds = datasets.Dataset(table)
    ds = ds.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    ds = datasets.DatasetDict(
        {"train": ds.map(lambda r, i: {"caption_0": f"red {i}", "caption_1": f"blue {i}"}, with_indices=True)}
    )
    ds.save_to_disk(str(tmp_path / "dcpo"))
    out = build_preference_dataset(
        DataConfig(format="double_caption", source=str(tmp_path / "dcpo"), resolution=16)
    )
    item = _check_pairs(out, 3, winner_colour=2)
    assert item["captions"] == ["blue 2", "red 2"]
    with pytest.raises(ValueError, match="no split 'test'"):
        build_preference_dataset(
            DataConfig(format="double_caption", source=str(tmp_path / "dcpo"), split="test")
        )


def test_hub_id_through_load_dataset(monkeypatch, tmp_path):
    local = datasets.Dataset(pickapic_table(_rows(4)))
    calls = []

    def fake_load_dataset(path, split=None, **kw):
        calls.append((path, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = build_preference_dataset(
        DataConfig(format="pickapic", source="kashif/pickascore", split="validation", resolution=16)
    )
    _check_pairs(ds, 4)
    assert calls == [("kashif/pickascore", "validation")]
    assert "hub:kashif/pickascore" in ds.describe()


def test_jsonl_pairs_and_ranked(tmp_path):
    (tmp_path / "img").mkdir()
    for name, colour in (("r", RED), ("b", BLUE), ("g", GREEN)):
        solid(colour, (40, 30)).save(tmp_path / "img" / f"{name}.png")
    lines = [
        {"prompt": "a", "chosen": "img/b.png", "rejected": "img/r.png"},
        {"prompt": "b", "chosen": "img/g.png", "rejected": "img/b.png"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = build_preference_dataset(
        DataConfig(format="jsonl", source=str(tmp_path / "pairs.jsonl"), resolution=16)
    )
    assert len(ds) == 2 and ds[0]["phi"].tolist() == [1.0, 0.0] and ds[1]["captions"] == ["b", "b"]
    assert mean_rgb(ds[0]["pixel_values"][0])[2] > 240 and ds[0]["original_size"][0].tolist() == [30, 40]
    ranked = [{"prompt": "x", "images": ["img/r.png", "img/g.png", "img/b.png"], "scores": [0.1, 0.9, 0.5]}]
    (tmp_path / "ranked.jsonl").write_text(json.dumps(ranked[0]) + "\n")
    rk = build_preference_dataset(
        DataConfig(format="jsonl", source=str(tmp_path / "ranked.jsonl"), resolution=16)
    )
    item = rk[0]
    assert item["phi"].tolist() == [1.0, 0.5, 0.0]  # one scorer: phi = wins / (k - 1)
    assert [max(range(3), key=lambda c: mean_rgb(p)[c]) for p in item["pixel_values"]] == [
        1,
        2,
        0,
    ]  # green, blue, red
    assert rk.stats["phi_from_scores"] == 1
    pairs = build_preference_dataset(
        DataConfig(format="jsonl", source=str(tmp_path / "ranked.jsonl"), resolution=16, ranked_as_pairs=True)
    )
    assert pairs[0]["pixel_values"].shape[0] == 2 and pairs[0]["phi"].tolist() == [1.0, 0.0]


def test_hpdv2_train_json(tmp_path):
    (tmp_path / "train").mkdir()
    solid(RED, (32, 32)).save(tmp_path / "train" / "a.jpg")
    solid(BLUE, (32, 32)).save(tmp_path / "train" / "b.jpg")
    rows = [{"prompt": "p", "file_path": ["a.jpg", "b.jpg"], "human_preference": [0, 1]}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    ds = build_preference_dataset(
        DataConfig(format="hpdv2", source=str(tmp_path / "train.json"), resolution=16)
    )
    assert mean_rgb(ds[0]["pixel_values"][0])[2] > 240 and ds[0]["phi"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("fmt", ["pickapic", "double_caption", "ranked"])
def test_builtin_sources_have_the_real_schema(fmt, builtin_cache):  # noqa: F811
    path = builtin_source(fmt, rows=20, seed=3)
    assert path.startswith(builtin_cache)
    names = pq.read_schema(path).names
    expected = {"pickapic": schema.PICKAPIC_V2_COLUMNS, "double_caption": schema.DOUBLE_CAPTION_COLUMNS,
                "ranked": schema.RANKED_COLUMNS}[fmt]  # fmt: skip
    assert list(names) == list(expected)
    ds = build_preference_dataset(
        DataConfig(format=fmt, source=f"builtin:{fmt}", builtin_rows=20, builtin_seed=3, resolution=16)
    )
    if fmt == "ranked":
        assert len(ds) == 20 and ds.num_candidates == 4
    else:
        assert ds.stats["ties"] == 2 and len(ds) == 18
        labels = pq.read_table(path, columns=["label_0"]).column(0).to_pylist()
        assert {0.0, 1.0, 0.5} <= set(labels)  # winners on both sides, and ties
        sizes = {tuple(ds[i]["original_size"][0].tolist()) for i in range(len(ds))}
        assert len(sizes) > 2  # varied sizes and aspect ratios
    # The learnable signal: the preferred image is cleaner (less high-frequency noise) than the rejected one.
    item = ds[0]
    noise = [float((p[:, 1:] - p[:, :-1]).abs().mean()) for p in item["pixel_values"]]
    assert noise[0] < noise[-1]
    assert builtin_source(fmt, rows=20, seed=3) == path  # cached by (format, rows, seed)


def test_builtin_must_match_format():
    with pytest.raises(ValueError, match="holds ranked data but format is 'pickapic'"):
        DataConfig(format="pickapic", source="builtin:ranked")
    with pytest.raises(ValueError, match="unknown builtin source"):
        DataConfig(format="pickapic", source="builtin:nope")
