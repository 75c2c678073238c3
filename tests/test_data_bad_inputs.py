"""A corpus of bad inputs: each ends in a clear error (message asserted) or a counted skip (counter asserted)."""

import json

import pyarrow as pa
import pytest
from data_helpers import builtin_cache, jpeg, pickapic_table, png, ranked_table, solid, write  # noqa: F401

from diffalign.data import DataConfig, DataFormatError, build_preference_dataset, collate_preference

GOOD = jpeg(solid((255, 0, 0), (32, 32)))
OTHER = jpeg(solid((0, 0, 255), (32, 32)))


def _build(tmp_path, rows, fmt="pickapic", **kw):
    table = pickapic_table(
        rows, double_caption=fmt == "double_caption", **{k: kw.pop(k) for k in ("drop", "types") if k in kw}
    )
    path = write(table, tmp_path / "bad.parquet")
    kw.setdefault("resolution", 16)
    return build_preference_dataset(DataConfig(format=fmt, source=path, **kw))


def row(**kw):
    base = {"caption": "c", "jpg_0": GOOD, "jpg_1": OTHER, "label_0": 1.0}
    base.update(kw)
    return base


def test_corrupt_and_truncated_jpeg_are_counted_skips(tmp_path):
    ds = _build(
        tmp_path, [row(), row(jpg_0=b"\xff\xd8garbage"), row(jpg_1=GOOD[: len(GOOD) // 2]), row(jpg_1=b"")]
    )
    items = [ds[i] for i in range(len(ds))]
    assert items[0] is not None and items[1] is None and items[2] is None and items[3] is None
    assert ds.stats["corrupt_image"] == 2 and ds.stats["missing_image"] == 1
    items += [ds[1]]  # reading again does not double count
    assert ds.stats["corrupt_image"] == 2
    batch = collate_preference(items)
    assert batch["skipped"] == 4 and batch["pixel_values"].shape[0] == 1


def test_tiny_images_are_counted_skips(tmp_path):
    one = png(solid((0, 0, 0), (1, 1)))
    thin = jpeg(solid((0, 0, 0), (64, 4)))
    ds = _build(tmp_path, [row(jpg_1=one), row(jpg_0=thin), row()], resolution=64)  # min side: 64 // 8 = 8
    assert ds[0] is None and ds[1] is None and ds[2] is not None
    assert ds.stats["too_small"] == 2
    lax = _build(tmp_path, [row(jpg_0=thin)], resolution=64, min_image_side=4)
    assert lax[0] is not None
    assert _build(tmp_path, [row(jpg_1=one)], min_image_side=1)[0] is None  # 1x1: always refused


def test_nan_out_of_range_and_soft_labels(tmp_path):
    rows = [row(label_0=float("nan")), row(label_0=None), row(label_0=1.5), row(label_0=-1.0), row(label_0=0.7),
            row(label_0=0.0), row(label_0=1.0, label_1=1.0)]  # fmt: skip
    ds = _build(tmp_path, rows)
    st = ds.stats
    assert (
        st["nan_label"] == 2
        and st["label_out_of_range"] == 2
        and st["soft_label"] == 1
        and st["label_mismatch"] == 1
    )
    assert len(ds) == 3 and "nan_label 2" in ds.describe()


def test_all_rows_unusable_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="no usable items.*ties 2"):
        _build(tmp_path, [row(label_0=0.5), row(label_0=0.5)])


def test_missing_columns_list_missing_and_found(tmp_path):
    with pytest.raises(DataFormatError) as err:
        _build(tmp_path, [row()], drop=("jpg_1", "label_0"))
    msg = str(err.value)
    assert "missing column(s) ['jpg_1', 'label_0']" in msg and "'jpg_0'" in msg and "found columns" in msg
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['caption_0', 'caption_1'\]"):
        _build(tmp_path, [row()], fmt="double_caption", drop=("caption_0", "caption_1"))
    # A rename through data.columns fixes it.
    ds = _build(tmp_path, [row()], drop=(), columns={"caption": "image_0_uid"})
    assert ds[0]["captions"] == ["u0-0", "u0-0"]


def test_wrong_type_columns(tmp_path):
    with pytest.raises(DataFormatError, match="column 'label_0' has type string, expected a number"):
        _build(tmp_path, [row(label_0="1")], types={"label_0": pa.string()})
    with pytest.raises(DataFormatError, match="column 'jpg_0' has type int64, expected encoded image bytes"):
        _build(tmp_path, [row(jpg_0=3)], types={"jpg_0": pa.int64()})
    with pytest.raises(DataFormatError, match="column 'caption' has type double, expected text"):
        _build(tmp_path, [row(caption=1.0)], types={"caption": pa.float64()})


def test_empty_and_null_captions_are_kept_and_counted(tmp_path):
    ds = _build(tmp_path, [row(caption=""), row(caption=None), row()])
    assert ds[0]["captions"] == ["", ""] and ds[1]["captions"] == ["", ""] and ds[2]["captions"] == ["c", "c"]
    assert ds.stats["empty_caption"] == 2 and ds.stats["missing_caption"] == 1


def test_ranked_bad_rows(tmp_path):
    im = [jpeg(solid((i * 60, 0, 0), (24, 24))) for i in range(4)]
    rows = [
        {"prompt": "ok", "images": im[:3], "phi": [0.2, 1.0, 0.5]},
        {"prompt": "nan", "images": im[:3], "phi": [0.2, float("nan"), 0.5]},
        {"prompt": "equal", "images": im[:3], "phi": [0.5, 0.5, 0.5]},
        {"prompt": "short", "images": im[:2], "phi": [1.0, 0.0, 0.5]},  # 2 images, 3 preferences
        {"prompt": "one", "images": im[:1], "phi": [1.0]},
    ]
    path = write(ranked_table(rows), tmp_path / "r.parquet")
    ds = build_preference_dataset(DataConfig(format="ranked", source=path, resolution=16))
    assert ds.stats["nan_phi"] == 1 and ds.stats["ties"] == 1 and ds.stats["too_few_candidates"] == 1
    assert len(ds) == 2 and ds[0]["phi"].tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert ds[1] is None and ds.stats["length_mismatch"] == 1
    gap = build_preference_dataset(DataConfig(format="ranked", source=path, resolution=16, min_phi_gap=0.9))
    assert gap.stats["below_min_phi_gap"] == 1 and len(gap) == 1
    pairs = build_preference_dataset(
        DataConfig(format="ranked", source=path, resolution=16, ranked_as_pairs=True)
    )
    assert pairs.stats["equal_phi"] == 1 and pairs[0]["phi"].tolist() == pytest.approx([1.0, 0.2])


def test_ranked_variable_k_is_a_clear_error_unless_pairs(tmp_path):
    im = [jpeg(solid((i * 60, 0, 0), (24, 24))) for i in range(4)]
    rows = [
        {"prompt": "a", "images": im[:3], "phi": [0.0, 1.0, 0.5]},
        {"prompt": "b", "images": im, "phi": [0.0, 1.0, 0.5, 0.2]},
    ]
    path = write(ranked_table(rows), tmp_path / "k.parquet")
    with pytest.raises(DataFormatError, match=r"different numbers of candidates K=\[3, 4\].*ranked_as_pairs"):
        build_preference_dataset(DataConfig(format="ranked", source=path))
    pairs = build_preference_dataset(
        DataConfig(format="ranked", source=path, resolution=16, ranked_as_pairs=True)
    )
    assert len(pairs) == 2 and pairs.num_candidates == 2


def test_ranked_phi_derived_from_scores_or_rank_and_missing(tmp_path):
    im = [jpeg(solid((i * 60, 0, 0), (24, 24))) for i in range(3)]
    rows = [
        {"prompt": "s", "images": im, "scores": {"a": [0.1, 0.3, 0.2], "b": [0.3, 0.2, 0.1]}, "rank": None},
        {"prompt": "r", "images": im, "scores": None, "rank": [2, 0, 1]},
        {"prompt": "none", "images": im, "scores": None, "rank": None},
    ]
    path = write(ranked_table(rows), tmp_path / "d.parquet")
    ds = build_preference_dataset(DataConfig(format="ranked", source=path, resolution=16))
    # Syn-Pic: phi_i = wins_i / (n_scorers * (k - 1)); wins = [0+2, 2+1, 1+0] over 2 scorers x 2 opponents.
    assert ds[0]["phi"].tolist() == [0.75, 0.5, 0.25]
    assert ds[1]["phi"].tolist() == [1.0, 0.5, 0.0]
    assert (
        ds.stats["phi_from_scores"] == 1 and ds.stats["phi_from_rank"] == 1 and ds.stats["missing_phi"] == 1
    )
    # scores with a NaN or of different lengths give no phi (unlike Syn-Pic, the loader does not rank
    # around a NaN): rank is used when there is one, else the row is skipped
    rows = [
        {"prompt": "nan", "images": im, "scores": {"a": [0.1, float("nan"), 0.2]}, "rank": [1, 2, 0]},
        {"prompt": "len", "images": im, "scores": {"a": [0.1, 0.2, 0.3], "b": [0.1, 0.2]}, "rank": None},
    ]
    ds = build_preference_dataset(DataConfig(format="ranked", source=write(ranked_table(rows), tmp_path / "e.parquet"), resolution=16))
    assert len(ds) == 1 and ds[0]["phi"].tolist() == [1.0, 0.5, 0.0] and ds.stats["phi_from_rank"] == 1
    assert ds.stats["phi_from_scores"] == 0 and ds.stats["missing_phi"] == 1
    no_pref = write(ranked_table([{"prompt": "x", "images": im}]), tmp_path / "n.parquet")
    with pytest.raises(
        DataFormatError, match=r"missing a preference column, one of \['phi', 'scores', 'rank'\]"
    ):
        build_preference_dataset(DataConfig(format="ranked", source=no_pref))
    wrong = write(
        ranked_table(
            [{"prompt": "x", "images": im, "phi": ["a", "b", "c"]}], types={"phi": pa.list_(pa.string())}
        ),
        tmp_path / "w.parquet",
    )
    with pytest.raises(
        DataFormatError, match="column 'phi' has type list<.*string>, expected a list of numbers"
    ):
        build_preference_dataset(DataConfig(format="ranked", source=wrong))


def test_bad_jsonl(tmp_path):
    def build(text, name="x.jsonl"):
        (tmp_path / name).write_text(text)
        return build_preference_dataset(
            DataConfig(format="jsonl", source=str(tmp_path / name), resolution=16)
        )

    with pytest.raises(DataFormatError, match="line 2: not valid JSON"):
        build('{"prompt": "a", "chosen": "a.png", "rejected": "b.png"}\n{oops\n')
    with pytest.raises(
        DataFormatError, match=r"line 1: missing key\(s\) \['rejected'\]; found keys \['chosen', 'prompt'\]"
    ):
        build('{"prompt": "a", "chosen": "a.png"}\n')
    with pytest.raises(DataFormatError, match="line 2: mixes a ranked line into a file of pair lines"):
        build(
            '{"prompt": "a", "chosen": "a.png", "rejected": "b.png"}\n{"prompt": "a", "images": ["a.png"], "phi": [1]}\n'
        )
    with pytest.raises(DataFormatError, match="'prompt' must be a string"):
        build('{"prompt": 3, "chosen": "a.png", "rejected": "b.png"}\n')
    with pytest.raises(DataFormatError, match=r"missing key\(s\) \['phi\|scores\|rank'\]"):
        build('{"prompt": "a", "images": ["a.png", "b.png"]}\n')
    solid((0, 0, 0), (16, 16)).save(tmp_path / "a.png")
    ds = build(json.dumps({"prompt": "a", "chosen": "a.png", "rejected": "gone.png"}) + "\n")
    assert ds[0] is None and ds.stats["missing_file"] == 1


def test_missing_local_sources_are_clear(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        build_preference_dataset(DataConfig(format="pickapic", source=str(tmp_path / "nope.parquet")))
    with pytest.raises(DataFormatError, match="holds no .parquet files"):
        build_preference_dataset(DataConfig(format="pickapic", source=str(tmp_path)))
    with pytest.raises(DataFormatError, match="matches no files"):
        build_preference_dataset(DataConfig(format="pickapic", source=str(tmp_path / "*.parquet")))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="cannot read parquet file"):
        build_preference_dataset(DataConfig(format="pickapic", source=str(tmp_path / "x.parquet")))
    with pytest.raises(ValueError, match="unknown column role"):
        DataConfig(format="pickapic", source="x", columns={"picture": "jpg"})
    with pytest.raises(ValueError, match="extra"):
        DataConfig(format="pickapic", source="x", colour="red")
