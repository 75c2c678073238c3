"""Row access to a preference source without decoding images up front.

A RowSource gives `num_rows`, `schema` (pyarrow), `column(name)` (a whole light column as Python values,
used for labels / phi at build time) and `row(i, columns)` (one row as Python values; image columns stay
encoded bytes, {bytes, path} structs or paths). Images are decoded later, in the dataset's __getitem__.
"""

from __future__ import annotations

import bisect
import codecs
import glob
import hashlib
import io
import json
import os
from collections import OrderedDict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.errors import UserError


class DataFormatError(UserError, ValueError):
    """The source cannot be read as the configured format (missing / wrong-type columns, bad file...)."""


class RowSource:
    num_rows: int
    schema: pa.Schema
    fingerprint: str  # short stable id of the source, part of every item key
    base_dir: str | None = None  # relative image paths are resolved against it
    description: str = ""
    single_images: bool = False  # a plain image + prompt set (jsonl "image" lines): one candidate per item

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def column(self, name: str) -> list[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def row(self, index: int, columns: list[str]) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


def _short_hash(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:10]


class ParquetSource(RowSource):
    """One or more parquet files, read lazily one row group at a time (a small LRU per process). Local
    files, or remote ones through an fsspec filesystem `fs` (hf://, s3://, https://...): then only the
    footers and the light columns are read when the dataset is built, and each row group when an item in
    it is first asked for; nothing is downloaded up front.

    Random access costs one row-group read per miss; for very large data read in random order, a
    `save_to_disk` copy (memory-mapped arrow) is faster, or `data.streaming` (one read per row group and
    epoch, diffalign/data/stream.py).
    """

    CACHE_ROW_GROUPS = 4

    def __init__(self, files: list[str], description: str = "", fs=None):
        if not files:
            raise DataFormatError(f"no parquet files found for {description!r}")
        self.fs = fs
        self.files = list(files) if fs is not None else [os.path.abspath(f) for f in files]
        self.description = description or self.files[0]
        self.base_dir = os.path.dirname(self.files[0]) if fs is None else None
        self.schema = None
        self._starts: list[int] = []  # global row index of each (file, row group)
        self._groups: list[tuple[int, int]] = []
        total = 0
        for fi, path in enumerate(self.files):
            try:
                meta = self._file(path).metadata
                schema = meta.schema.to_arrow_schema()
            except Exception as err:
                raise DataFormatError(f"cannot read parquet file {path}: {err}") from err
            if self.schema is None:
                self.schema = schema
            elif not schema.equals(self.schema):
                raise DataFormatError(
                    f"parquet files disagree on the schema: {self.files[0]} has {self.schema.names}, "
                    f"{path} has {schema.names}"
                )
            for rg in range(meta.num_row_groups):
                self._starts.append(total)
                self._groups.append((fi, rg))
                total += meta.row_group(rg).num_rows
        self.num_rows = total
        size = os.path.getsize if fs is None else fs.size
        self.fingerprint = _short_hash("parquet", *((os.path.basename(f), size(f)) for f in self.files), total)
        self._cache: OrderedDict = OrderedDict()
        #: row-group reads made by this process (what data.streaming keeps to one per group and epoch)
        self.reads = 0

    def _file(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(path, filesystem=self.fs)

    def row_group_of(self, rows) -> list[int]:
        """The row group (index over all files) holding each global row index."""
        return [bisect.bisect_right(self._starts, int(r)) - 1 for r in rows]

    def __getstate__(self):  # DataLoader workers: ship paths, not open readers
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def column(self, name: str) -> list[Any]:
        out: list[Any] = []
        for path in self.files:
            out.extend(self._file(path).read(columns=[name]).column(name).to_pylist())
        return out

    def row(self, index: int, columns: list[str]) -> dict[str, Any]:
        if not 0 <= index < self.num_rows:
            raise IndexError(index)
        g = bisect.bisect_right(self._starts, index) - 1
        key = (g, tuple(columns))
        table = self._cache.get(key)
        if table is None:
            fi, rg = self._groups[g]
            table = self._file(self.files[fi]).read_row_group(rg, columns=list(columns))
            self.reads += 1
            self._cache[key] = table
            while len(self._cache) > self.CACHE_ROW_GROUPS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return table.slice(index - self._starts[g], 1).to_pylist()[0]


class HFSource(RowSource):
    """A `datasets.Dataset` (hub id or save_to_disk folder), read in arrow format (images stay encoded)."""

    def __init__(self, dataset, description: str, base_dir: str | None = None):
        self.ds = dataset.with_format("arrow")
        self.description = description
        self.base_dir = base_dir
        self.num_rows = len(dataset)
        self.schema = dataset.features.arrow_schema
        self.fingerprint = _short_hash("hf", description, getattr(dataset, "_fingerprint", ""), self.num_rows)

    def column(self, name: str) -> list[Any]:
        return self.ds[name].to_pylist()  # arrow format: honours an indices mapping (select / shuffle)

    def row(self, index: int, columns: list[str]) -> dict[str, Any]:
        return self.ds[index].select(columns).to_pylist()[0]


class ListSource(RowSource):
    """Rows held in memory (jsonl / HPDv2 json): small text rows whose images are file paths."""

    def __init__(
        self, rows: list[dict[str, Any]], schema: pa.Schema, description: str, base_dir: str, fp: str
    ):
        self.rows = rows
        self.schema = schema
        self.description = description
        self.base_dir = base_dir
        self.num_rows = len(rows)
        self.fingerprint = fp

    def column(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]

    def row(self, index: int, columns: list[str]) -> dict[str, Any]:
        r = self.rows[index]
        return {c: r.get(c) for c in columns}


# ----------------------------------------------------------------------------------------------- resolvers


def _is_disk_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def _pick_split(dataset, split: str, where: str):
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataFormatError(f"{where} has no split {split!r}; splits: {sorted(dataset)}")
        return dataset[split]
    return dataset


def _parquet_files_for_split(files: list[str], split: str) -> list[str]:
    """Hub-style layouts name shards `<split>-00000-of-00010.parquet` or put them under `<split>/`."""
    chosen = [
        f for f in files
        if os.path.basename(f).startswith(f"{split}-") or os.path.basename(f) == f"{split}.parquet"
        or f"{os.sep}{split}{os.sep}" in f
    ]  # fmt: skip
    return chosen or files


def open_source(source: str, split: str = "train") -> RowSource:
    """Resolve a table-like source (not jsonl / HPDv2 json, see jsonl.py) to a RowSource."""
    if "://" in source:  # a remote (or fsspec) location: parquet files read in place, never downloaded whole
        return _remote_parquet(source, split)
    if _is_disk_dataset(source):
        import datasets

        ds = _pick_split(datasets.load_from_disk(source), split, source)
        return HFSource(ds, description=os.path.abspath(source), base_dir=os.path.abspath(source))
    if os.path.isfile(source):
        if not source.endswith(".parquet"):
            raise DataFormatError(f"{source} is a file but not .parquet / .jsonl / .json")
        return ParquetSource([source], description=source)
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
        if not files:
            raise DataFormatError(f"folder {source} holds no .parquet files and is not a save_to_disk folder")
        return ParquetSource(_parquet_files_for_split(files, split), description=source)
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source, recursive=True))
        if not files:
            raise DataFormatError(f"glob {source!r} matches no files")
        return ParquetSource(files, description=source)
    if source.startswith((".", "/", "~")) or source.endswith(".parquet"):
        raise DataFormatError(f"local source {source!r} does not exist")
    import datasets  # a hub id

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:
        raise DataFormatError(f"cannot load hub dataset {source!r} (split {split!r}): {err}") from err
    return HFSource(_pick_split(ds, split, source), description=f"hub:{source}")


def _remote_parquet(source: str, split: str) -> ParquetSource:
    """Parquet files at an fsspec URL (hf://datasets/ORG/NAME/..., s3://, gs://, https://, memory://): one
    file, a folder searched recursively, or a glob."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
        if any(ch in path for ch in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = _parquet_files_for_split(sorted(fs.glob(path.rstrip("/") + "/**/*.parquet")), split)
        else:
            files = [path] if fs.exists(path) else []
    except (ImportError, ValueError, OSError) as err:
        raise DataFormatError(f"cannot open {source!r}: {err}") from err
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise DataFormatError(f"{source!r} holds no .parquet files")
    return ParquetSource(files, description=source, fs=fs)


def read_utf8_text(path: str | os.PathLike, error: type[Exception] = DataFormatError) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped). A file that is not UTF-8 raises
    `error` with one line naming the file, the line and byte offset of the first bad byte, and the fix."""
    with open(path, "rb") as fh:
        data = fh.read()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        line = data.count(b"\n", 0, at) + 1
        raise error(
            f"{path}: not UTF-8 text (line {line}, byte offset {at}: {data[at:at + 1]!r}); save the file as "
            "UTF-8 (e.g. `iconv -f <its encoding> -t utf-8`)"
        ) from err


def read_json_rows(path: str) -> list[dict[str, Any]]:
    """A .jsonl file (one object per line; blank lines skipped) or a .json list of objects, in UTF-8."""
    text = read_utf8_text(path)
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise DataFormatError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataFormatError(f"{path}: expected a JSON list of objects")
        return rows
    with io.StringIO(text, newline=None) as fh:  # \n, \r\n and \r end a line, as when reading the file as text
        rows = []
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nesting too deep
                raise DataFormatError(f"{path} line {n}: not valid JSON: {err}") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
        return rows
