"""A corpus of bad inputs, one table, one test: each case ends in a clear error (the real `diffalign` CLI,
exit 2, one line naming the file or key and the fix, no traceback) or a counted skip (the real loader: the
item is None and its reason counted), and hostile files never run code or hang. Odd but valid images
decode (outcome `ok`). Other tests cover neighbouring cases and are not repeated here:
tests/test_data_bad_inputs.py (labels, ties, columns, ranked rows), tests/test_image_decoding.py (16-bit,
EXIF, alpha), tests/test_utf8_errors.py (non-UTF-8 text), tests/test_score_files.py (`diffalign score`),
tests/test_preflight.py (the named run-time cases).

Every fixture is tiny and built in code. `python -m tests.test_bad_input_corpus` prints the table with the
outcome each case has now."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.data_helpers import jpeg, pickapic_table, png, ranked_table, solid, write
from tests.helpers import tiny_config

RES = 16
MARKER = "code-ran"  # a hostile file that runs code would create this file in the case's folder


# ---- bytes --------------------------------------------------------------------------------------------------


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels, with one row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _bad_crc_png() -> bytes:
    data = bytearray(png(solid((0, 255, 0), (24, 24))))
    data[29] ^= 0xFF  # a byte of IHDR's CRC
    return bytes(data)


class _Payload:
    """Unpickling it would create MARKER in the working folder."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


def _pickle_bomb() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": _Payload()}, buf)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [solid((255, 0, 0), (24, 24)).convert("P"), solid((0, 0, 255), (24, 24)).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    return buf.getvalue()


GOOD = jpeg(solid((255, 0, 0), (24, 24)))
IMAGES: dict[str, bytes] = {
    "empty bytes": b"",
    "random bytes": bytes(random.Random(0).randrange(256) for _ in range(512)),
    "JPEG start marker only": b"\xff\xd8\xff",
    "JPEG cut after 100 bytes": GOOD[:100],
    "PNG cut in half": (lambda b: b[: len(b) // 2])(png(solid((0, 0, 255), (24, 24)))),
    "PNG with a bad header CRC": _bad_crc_png(),
    "GIF cut in half": (lambda b: b[: len(b) // 2])(_enc(solid((9, 9, 9), (24, 24)), "GIF")),
    "plain text": b"hello, I am not an image\n",
    "HTML error page": b"<!doctype html><html><body>404 Not Found</body></html>",
    "SVG": b"<svg xmlns='http://www.w3.org/2000/svg' width='24' height='24'><rect width='24' height='24'/></svg>",
    "HEIC header (no decoder)": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64,
    "decompression bomb (100000 x 100000 PNG)": _png_declaring(100_000, 100_000),
    "huge: 10000 x 10000 grey PNG (under PIL's bomb limit)": _png_declaring(10_000, 10_000),
    "torch pickle bomb as image bytes": _pickle_bomb(),
    "1 x 1 pixel": png(solid((1, 2, 3), (1, 1))),
    "64 x 1 strip": png(solid((1, 2, 3), (64, 1))),
    # odd but valid: decoded
    "CMYK JPEG": _enc(solid((255, 0, 0), (24, 24)).convert("CMYK"), "JPEG"),
    "1-bit PNG": png(solid((255, 255, 255), (24, 24)).convert("1")),
    "palette PNG": png(solid((0, 128, 0), (24, 24)).convert("P")),
    "animated GIF": _animated_gif(),
    "WebP": _enc(solid((10, 20, 30), (24, 24)), "WEBP"),
    "BMP": _enc(solid((10, 20, 30), (24, 24)), "BMP"),
    "32-bit float TIFF": _enc(Image.fromarray(np.full((24, 24), 0.5, np.float32)), "TIFF"),
    "3000 x 2000 JPEG": jpeg(solid((200, 100, 0), (3000, 2000)), quality=50),
}

# ---- cases --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    #: folder -> (argv for `diffalign` | a DataConfig dict for the loader, what must be named)
    make: Callable[[Path], tuple]
    #: "error" (CLI exit 2, one line), "skip:<reason>" (loader: item None, counted), "ok" (decodes)
    expect: str
    #: substrings the error line must hold besides the names `make` returns (the fix, the reason)
    says: tuple[str, ...] = field(default_factory=tuple)


def _pair_table(folder: Path, jpg_0) -> dict:
    rows = [{"caption": "a red circle", "jpg_0": jpg_0, "jpg_1": GOOD, "label_0": 1.0}]
    return {"format": "pickapic", "source": write(pickapic_table(rows), folder / "pairs.parquet"), "resolution": RES}


def image_case(label: str) -> Callable:
    return lambda folder: (_pair_table(folder, IMAGES[label]), ())


def _jsonl_pair(folder: Path, chosen) -> dict:
    (folder / "good.jpg").write_bytes(GOOD)
    line = {"prompt": "a red circle", "chosen": chosen, "rejected": "good.jpg"}
    (folder / "pairs.jsonl").write_text(json.dumps(line) + "\n")
    return {"format": "jsonl", "source": str(folder / "pairs.jsonl"), "resolution": RES}


def path_case(prepare: Callable[[Path], object]) -> Callable:
    return lambda folder: (_jsonl_pair(folder, prepare(folder)), ())


def _symlink_loop(folder: Path) -> str:
    os.symlink(folder / "loop_b", folder / "loop_a")
    os.symlink(folder / "loop_a", folder / "loop_b")
    return "loop_a"


def _fifo(folder: Path) -> str:
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    return "pipe.png"


def _write(folder: Path, name: str, data: bytes | str) -> str:
    p = folder / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(p)


def train(folder: Path, data: dict | None = None, *extra: str, **sections) -> list[str]:
    """argv of `diffalign train` on a tiny config whose data / sections are replaced."""
    cfg = tiny_config(folder, **({"data": {**data, "resolution": RES}} if data else {}), **sections)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["train", str(path), *extra]


def data_error(text_or_bytes, name: str, fmt: str = "jsonl") -> Callable:
    def make(folder: Path):
        src = _write(folder, name, text_or_bytes)
        return train(folder, {"format": fmt, "source": src}), (src,)

    return make


def table_error(build: Callable[[Path], str], fmt: str = "pickapic") -> Callable:
    def make(folder: Path):
        src = build(folder)
        return train(folder, {"format": fmt, "source": src}), (src,)

    return make


def _pairs(rows, **kw) -> Callable[[Path], str]:
    return lambda folder: write(pickapic_table(rows, **kw), folder / "pairs.parquet")


def _row(**kw) -> dict:
    return {"caption": "c", "jpg_0": GOOD, "jpg_1": GOOD, "label_0": 1.0, **kw}


def _ranked(rows, **kw) -> Callable[[Path], str]:
    return lambda folder: write(ranked_table(rows, **kw), folder / "ranked.parquet")


def _schemas_differ(folder: Path) -> str:
    d = folder / "shards"
    d.mkdir()
    write(pickapic_table([_row()]), d / "a.parquet")
    write(pickapic_table([_row()], drop=("caption",)), d / "b.parquet")
    return str(d)


def config_error(text: str | bytes, *extra: str) -> Callable:
    def make(folder: Path):
        path = _write(folder, "cfg.yaml", text)
        return ["train", path, *extra], (path,)

    return make


def override_error(*overrides: str) -> Callable:
    def make(folder: Path):
        argv = train(folder, None, *overrides)
        return argv, (argv[1],)

    return make


_GOOD_CONFIG = yaml.safe_dump(tiny_config(Path("/nonexistent")))


def _checkpoint(folder: Path) -> Path:
    """A checkpoint folder of the files a LoRA run writes (made directly, not by a run)."""
    from safetensors.torch import save_file

    ck = folder / "run" / "checkpoints" / "step-0000001"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 1, "micro": 1, "counters": {}}))
    save_file({"w": torch.zeros(2)}, str(ck / "lora_0.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ck / "optimizer.bin")
    torch.save({"last_epoch": 1}, ck / "scheduler.bin")
    torch.save({"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, ck / "random_states_0.pkl")  # fmt: skip
    (ck.parent / "latest").write_text(ck.name)
    return ck


def checkpoint_error(damage: Callable[[Path], Path], resume: str | None = None) -> Callable:
    def make(folder: Path):
        bad = damage(_checkpoint(folder))
        argv = train(folder, None, "--resume", resume or str(folder / "run" / "checkpoints" / "step-0000001"))
        return argv, (str(bad),)

    return make


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], Path]:
    def damage(ck: Path) -> Path:
        f = ck / name
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])
        return f

    return damage


def _replace(name: str, data: bytes) -> Callable[[Path], Path]:
    def damage(ck: Path) -> Path:
        (ck / name).write_bytes(data)
        return ck / name

    return damage


def _cache(folder: Path) -> Path:
    from safetensors.torch import save_file

    cache = folder / "cache"
    cache.mkdir()
    save_file({"i.0.0.mean": torch.zeros(4, 2, 2)}, str(cache / "shard-00000.safetensors"))
    (cache / "index.json").write_text(json.dumps({"fingerprint": {}, "n_items": 1, "skipped": 0, "cond_keys": [],
                                                  "items": {"0": "shard-00000.safetensors"}, "captions": {}}))  # fmt: skip
    return cache


def _latest_to_nowhere(folder: Path):
    (_checkpoint(folder).parent / "latest").write_text("step-0000009")
    return train(folder, None, "--resume", "latest"), (str(folder / "run" / "checkpoints" / "step-0000009"),)


def cache_error(damage: Callable[[Path], Path]) -> Callable:
    def make(folder: Path):
        bad = damage(_cache(folder))
        return train(folder, None, "cache.enabled=true", f"cache.dir={folder / 'cache'}"), (str(bad),)

    return make


CASES: list[Case] = [
    # -- images in a table: counted skips, or decoded
    *[Case(f"image: {k}", image_case(k), "skip:missing_image") for k in ("empty bytes",)],
    *[Case(f"image: {k}", image_case(k), "skip:corrupt_image") for k in (
        "random bytes", "JPEG start marker only", "JPEG cut after 100 bytes", "PNG cut in half",
        "PNG with a bad header CRC", "GIF cut in half", "plain text", "HTML error page", "SVG",
        "HEIC header (no decoder)", "decompression bomb (100000 x 100000 PNG)", "torch pickle bomb as image bytes")],  # fmt: skip
    *[Case(f"image: {k}", image_case(k), "skip:too_small") for k in ("1 x 1 pixel", "64 x 1 strip")],
    *[Case(f"image: {k}", image_case(k), "ok") for k in (
        "CMYK JPEG", "1-bit PNG", "palette PNG", "animated GIF", "WebP", "BMP", "32-bit float TIFF", "3000 x 2000 JPEG",
        "huge: 10000 x 10000 grey PNG (under PIL's bomb limit)")],  # fmt: skip
    Case("image: null in the table", lambda f: (_pair_table(f, None), ()), "skip:missing_image"),
    # -- image paths in a JSONL file: counted skips
    Case("path: http URL", path_case(lambda f: "http://example.com/a.png"), "skip:missing_file"),
    Case("path: https URL", path_case(lambda f: "https://example.com/a.png?x=1"), "skip:missing_file"),
    Case("path: s3 URL", path_case(lambda f: "s3://bucket/a.png"), "skip:missing_file"),
    Case("path: missing relative file", path_case(lambda f: "gone.png"), "skip:missing_file"),
    Case("path: missing absolute file", path_case(lambda f: str(f / "nowhere" / "x.png")), "skip:missing_file"),
    Case("path: a folder", path_case(lambda f: (f / "sub").mkdir() or "sub"), "skip:missing_file"),
    Case("path: a symlink loop", path_case(_symlink_loop), "skip:missing_file"),
    Case("path: a dangling symlink", path_case(lambda f: os.symlink(f / "gone", f / "dangling") or "dangling"),
         "skip:missing_file"),  # fmt: skip
    Case("path: a named pipe (would block)", path_case(_fifo), "skip:missing_file"),
    Case("path: /dev/zero (endless)", path_case(lambda f: "/dev/zero"), "skip:missing_file"),
    Case("path: empty string", path_case(lambda f: ""), "skip:missing_image"),
    Case("path: NUL byte in the name", path_case(lambda f: "a\x00.png"), "skip:missing_file"),
    Case("path: 5000 characters", path_case(lambda f: "x" * 5000 + ".png"), "skip:missing_file"),
    Case("path: ../ traversal to a text file", path_case(lambda f: os.path.relpath(_write(f.parent, f"{f.name}.txt", "hi"), f)),
         "skip:corrupt_image"),  # fmt: skip
    Case("path: a pickle bomb named .png", path_case(lambda f: _write(f, "bomb.png", _pickle_bomb())), "skip:corrupt_image"),
    Case("path: a text file named .jpg", path_case(lambda f: _write(f, "note.jpg", "not a jpeg")), "skip:corrupt_image"),
    # -- JSONL / JSON files: errors
    Case("jsonl: invalid JSON", data_error('{"prompt": "a", "chosen": "a.png"\n', "d.jsonl"), "error", ("line 1", "not valid JSON")),
    Case("jsonl: a line that is an array", data_error('["a", "b"]\n', "d.jsonl"), "error", ("expected a JSON object",)),
    Case("jsonl: missing key", data_error('{"prompt": "a", "chosen": "a.png"}\n', "d.jsonl"), "error", ("rejected",)),
    Case("jsonl: prompt is a number", data_error('{"prompt": 3, "chosen": "a.png", "rejected": "b.png"}\n', "d.jsonl"),
         "error", ("'prompt' must be a string",)),  # fmt: skip
    Case("jsonl: empty file", data_error("", "d.jsonl"), "error", ("holds no rows",)),
    Case("jsonl: blank lines only", data_error("\n  \n\n", "d.jsonl"), "error", ("holds no rows",)),
    Case("jsonl: UTF-16", data_error('{"prompt": "a"}\n'.encode("utf-16"), "d.jsonl"), "error", ("not UTF-8",)),
    Case("jsonl: NUL inside a string", data_error(b'{"prompt": "a\x00", "chosen": "a", "rejected": "b"}\n', "d.jsonl"),
         "error", ("not valid JSON",)),  # fmt: skip
    Case("jsonl: nesting 100000 deep", data_error('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n", "d.jsonl"),
         "error", ("not valid JSON",)),  # fmt: skip
    Case("jsonl: pair and ranked lines mixed",
         data_error('{"prompt": "a", "chosen": "a", "rejected": "b"}\n{"prompt": "a", "images": ["a"], "phi": [1]}\n',
                    "d.jsonl"), "error", ("mixes",)),  # fmt: skip
    Case("jsonl: every image a URL", lambda f: (train(f, _jsonl_pair(f, "https://example.com/x.png") | {
        "source": _write(f, "urls.jsonl", json.dumps({"prompt": "p", "chosen": "https://e.com/a.png",
                                                      "rejected": "https://e.com/b.png"}) + "\n")}), ()),
         "error", ("1 of 1", "missing_file", "URLs are not downloaded")),  # fmt: skip
    Case("hpdv2 json: not a list", data_error('{"a": 1}', "train.json", "hpdv2"), "error", ("expected a JSON list of objects",)),
    Case("hpdv2 json: a list of numbers", data_error("[1, 2]", "train.json", "hpdv2"), "error", ("expected a JSON list of objects",)),
    # -- tables: errors
    Case("parquet: garbage bytes", table_error(lambda f: _write(f, "x.parquet", b"PAR1 not really")), "error", ("cannot read parquet",)),
    Case("parquet: cut in half", table_error(lambda f: _write(f, "x.parquet", Path(_pairs([_row()])(f)).read_bytes()[:300])),
         "error", ("cannot read parquet",)),  # fmt: skip
    Case("parquet: zero bytes", table_error(lambda f: _write(f, "x.parquet", b"")), "error", ("cannot read parquet",)),
    Case("parquet: a CSV named .parquet", table_error(lambda f: _write(f, "x.parquet", "caption,jpg_0\na,b\n")),
         "error", ("cannot read parquet",)),  # fmt: skip
    Case("parquet: no rows", table_error(_pairs([])), "error", ("no usable items",)),
    Case("parquet: every image corrupt", table_error(_pairs([_row(jpg_0=b"bad")] * 3)), "error",
         ("3 of 3", "corrupt_image 3", "max_skip_fraction")),  # fmt: skip
    Case("parquet: a missing column", table_error(_pairs([_row()], drop=("jpg_1",))), "error", ("missing column",)),
    Case("parquet: label as text", table_error(_pairs([_row(label_0="1")], types={"label_0": __import__("pyarrow").string()})),
         "error", ("'label_0' has type string",)),  # fmt: skip
    Case("parquet: all ties", table_error(_pairs([_row(label_0=0.5)] * 2)), "error", ("no usable items", "ties")),
    Case("parquet: all labels NaN", table_error(_pairs([_row(label_0=float("nan"))] * 2)), "error", ("no usable items", "nan_label")),
    Case("parquet: shards with different schemas", table_error(_schemas_differ), "error", ("disagree on the schema",)),
    Case("folder: no parquet files", table_error(lambda f: str((f / "empty").mkdir() or f / "empty")), "error", ("holds no .parquet",)),
    Case("glob: matches nothing", table_error(lambda f: str(f / "*.parquet")), "error", ("matches no files",)),
    Case("file: a .csv source", table_error(lambda f: _write(f, "pairs.csv", "a,b\n")), "error", ("not .parquet",)),
    Case("local source: does not exist", table_error(lambda f: str(f / "none" / "pairs.parquet")), "error", ("does not exist",)),
    Case("ranked: phi as text", table_error(_ranked([{"prompt": "p", "images": [GOOD, GOOD], "phi": ["a", "b"]}],
                                                    types={"phi": __import__("pyarrow").list_(__import__("pyarrow").string())}),
                                            "ranked"), "error", ("expected a list of numbers",)),  # fmt: skip
    Case("ranked: no preference column", table_error(_ranked([{"prompt": "p", "images": [GOOD, GOOD]}]), "ranked"),
         "error", ("missing a preference column",)),  # fmt: skip
    Case("ranked: different K per row", table_error(_ranked([{"prompt": "p", "images": [GOOD] * 2, "phi": [1.0, 0.0]},
                                                             {"prompt": "q", "images": [GOOD] * 3, "phi": [1.0, 0.5, 0.0]}]),
                                                    "ranked"), "error", ("ranked_as_pairs",)),  # fmt: skip
    # -- configs: errors
    Case("config: unknown top-level key", config_error(_GOOD_CONFIG + "trian: {}\n"), "error", ("Did you mean 'train'",)),
    Case("config: misspelt nested key", config_error(_GOOD_CONFIG.replace("max_steps", "max_stpes")), "error",
         ("train.max_stpes", "Did you mean 'train.max_steps'")),  # fmt: skip
    Case("config: wrong type", config_error(_GOOD_CONFIG.replace("max_steps: 2", "max_steps: two")), "error", ("train.max_steps",)),
    Case("config: YAML syntax error", config_error("model: {pretrained: [\n"), "error", ("not valid YAML",)),
    Case("config: !!python/object tag", config_error("model: !!python/object:os.system {}\n"), "error", ("not valid YAML",)),
    Case("config: !!python/object/apply runs nothing",
         config_error(f"model: !!python/object/apply:builtins.open ['{MARKER}', 'w']\n"), "error", ("not valid YAML",)),  # fmt: skip
    Case("config: a list at the top", config_error("- a\n- b\n"), "error", ("must be a mapping",)),
    Case("config: empty file", config_error(""), "error", ("missing required key 'model'",)),
    Case("config: Latin-1 bytes", config_error(_GOOD_CONFIG.replace("tiny:sd", "caf\u00e9").encode("latin-1")), "error", ("not UTF-8",)),
    Case("config: billion-laughs aliases", config_error(_GOOD_CONFIG + "lol: &a [x, x, x, x, x, x, x, x]\n"
                                                        + "".join(f"l{i}: &l{i} [{', '.join(['*' + ('a' if i == 0 else f'l{i - 1}')] * 9)}]\n"
                                                                  for i in range(8))), "error", ("unknown key 'lol'",)),  # fmt: skip
    Case("config: missing file", lambda f: (["train", str(f / "nope.yaml")], (str(f / "nope.yaml"),)), "error", ("not found",)),
    Case("config: a folder", lambda f: (["train", str(f)], (str(f),)), "error", ("not found",)),
    Case("override: no '='", lambda f: (train(f, None, "train.max_steps"), ("'train.max_steps'",)), "error",
         ("dotted.key=value",)),  # fmt: skip
    Case("override: list index out of range", lambda f: (train(f, None, "validation.seeds=[0]", "validation.seeds.5=1"),
                                                         ("validation.seeds.5",)), "error", ("not an index",)),  # fmt: skip
    Case("override: written as --option", lambda f: (train(f, None, "--train.max_steps=4"), ("--train.max_steps=4",)),
         "error", ("write train.max_steps=4",)),  # fmt: skip
    Case("override: beta = 0", override_error("objective.beta=0"), "error", ("objective.beta", "greater than 0")),
    Case("override: negative beta", override_error("objective.beta=-5"), "error", ("objective.beta",)),
    Case("override: negative lr", override_error("optim.lr=-1"), "error", ("optim.lr",)),
    Case("override: unknown objective", override_error("objective.name=dpoo"), "error", ("dpoo",)),
    Case("override: LoRA rank 0", override_error("lora.rank=0"), "error", ("lora.rank",)),
    Case("override: unknown data format", override_error("data.format=csv"), "error", ("data.format",)),
    Case("override: builtin source of another format", override_error("data.source=builtin:ranked"), "error", ("builtin:ranked",)),
    Case("override: max_skip_fraction 2", override_error("data.max_skip_fraction=2"), "error", ("data.max_skip_fraction",)),
    Case("model: a missing local folder", lambda f: (train(f, None, f"model.pretrained={f / 'model'}"), (str(f / "model"),)),
         "error", ("does not exist",)),  # fmt: skip
    Case("model: a folder without model_index.json", lambda f: (train(f, None, f"model.pretrained={f}"), (str(f),)),
         "error", ("no model_index.json",)),  # fmt: skip
    Case("model: hub id while offline", lambda f: (train(f, None, "model.pretrained=nobody/nothing"), ("nobody/nothing",)),
         "error", ("offline", "hf download")),  # fmt: skip
    # -- checkpoints (--resume): errors naming the file, nothing unpickled
    Case("checkpoint: LoRA weights cut in half", checkpoint_error(_truncate("lora_0.safetensors")), "error", ("truncated",)),
    Case("checkpoint: optimizer.bin cut in half", checkpoint_error(_truncate("optimizer.bin")), "error", ("truncated",)),
    Case("checkpoint: scheduler.bin zero bytes", checkpoint_error(_truncate("scheduler.bin", 0)), "error", ("truncated",)),
    Case("checkpoint: a pickle bomb as optimizer.bin", checkpoint_error(_replace("optimizer.bin", _pickle_bomb())), "error",
         ("io.open", "refuses")),  # fmt: skip
    Case("checkpoint: a pickle bomb as RNG state", checkpoint_error(_replace("random_states_0.pkl", _pickle_bomb())),
         "error", ("io.open",)),  # fmt: skip
    Case("checkpoint: a planted custom_checkpoint_0.pkl", checkpoint_error(_replace("custom_checkpoint_0.pkl", _pickle_bomb())),
         "error", ("does not read it",)),  # fmt: skip
    Case("checkpoint: a pickle named lora_0.safetensors", checkpoint_error(_replace("lora_0.safetensors", _pickle_bomb())),
         "error", ("not a safetensors file",)),  # fmt: skip
    Case("checkpoint: trainer_state.json garbage", checkpoint_error(_replace("trainer_state.json", b"{step: 1")), "error",
         ("unreadable",)),  # fmt: skip
    Case("checkpoint: no trainer_state.json", checkpoint_error(lambda ck: (ck / "trainer_state.json").unlink() or ck),
         "error", ("not a complete diffalign checkpoint",)),  # fmt: skip
    Case("checkpoint: latest points at a deleted folder", _latest_to_nowhere, "error", ("not a complete diffalign checkpoint",)),
    Case("checkpoint: --resume a missing folder", lambda f: (train(f, None, "--resume", str(f / "ckpt")), (str(f / "ckpt"),)),
         "error", ("no such checkpoint folder",)),  # fmt: skip
    # -- latent cache: errors naming the file
    Case("cache: no index.json", cache_error(lambda c: (c / "index.json").unlink() or c), "error", ("diffalign cache",)),
    Case("cache: index.json garbage", cache_error(lambda c: _write(c, "index.json", "{items") and c / "index.json"), "error",
         ("unreadable",)),  # fmt: skip
    Case("cache: a shard cut short", cache_error(lambda c: _truncate("shard-00000.safetensors", 0.8)(c)), "error", ("truncated",)),
    Case("cache: a shard missing", cache_error(lambda c: (c / "shard-00000.safetensors").unlink() or c / "shard-00000.safetensors"),
         "error", ("missing",)),  # fmt: skip
]


# ---- running a case -----------------------------------------------------------------------------------------


def run_case(case: Case, folder: Path, read_err: Callable[[], str]) -> tuple[str, tuple[str, ...]]:
    """Run one case in `folder`: (the outcome: the error line, or the counted reason or "decoded"; the
    names the error line must hold)."""
    from diffalign.data import DataConfig, build_preference_dataset

    made, names = case.make(folder)
    if case.expect == "error":
        from diffalign.cli import main

        rc = main(made)
        err = read_err().strip()
        assert rc == 2, f"exit {rc}: {err}"
        return err, names
    ds = build_preference_dataset(DataConfig(**made))
    item = ds[0]
    if case.expect == "ok":
        assert item is not None and tuple(item["pixel_values"].shape) == (2, 3, RES, RES), ds.stats
        return "decoded", names
    reason = case.expect.split(":", 1)[1]
    assert item is None, f"{case.name}: not skipped"
    assert ds.stats.get(reason) == 1, ds.stats
    return f"skipped, counted as {reason}: {getattr(ds, 'skip_examples', {}).get(reason, '')}", names


@pytest.fixture
def in_folder(tmp_path, monkeypatch):
    """Each case in its own folder, the working directory (where a hostile file's marker would appear);
    the hub offline so a hub id is never fetched."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, in_folder, capsys):
    outcome, names = run_case(case, in_folder, lambda: capsys.readouterr().err)
    assert not (in_folder / MARKER).exists(), "a hostile file ran code"
    if case.expect == "error":
        # one line; a config with several problems lists one per line under the line naming the file
        first, *more = outcome.splitlines()
        assert "Traceback" not in outcome and all(line.startswith("- ") for line in more), outcome
        assert first.startswith("diffalign train: "), outcome
        for needle in (*names, *case.says):
            assert needle in (first if needle in names else outcome), (needle, outcome)


def test_the_corpus_is_large_and_names_files():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)


if __name__ == "__main__":  # the corpus table (case, expected, outcome), for release notes
    import contextlib
    import sys
    import tempfile

    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    print("| case | outcome |\n|---|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            buf = io.StringIO()
            cwd = os.getcwd()
            os.chdir(d)
            try:
                with contextlib.redirect_stderr(buf):
                    outcome, _ = run_case(case, Path(d), buf.getvalue)
            except AssertionError as err:
                outcome = f"UNEXPECTED: {err}"
            finally:
                os.chdir(cwd)
        text = outcome.replace("diffalign train: ", "exit 2: ").replace(d, "<case folder>").replace("|", "\\|")
        print(f"| {case.name} | {text} |")
    sys.exit(0)
