"""Syn-Pic generation: prompts x k generators x n scorers -> phi -> sharded parquet (ranked schema).

Layout of the output directory:

    run.json                   the run's fingerprint (config minus output_dir, prompt list hash, plan)
    data/shard-00000.parquet   rows [0, shard_size), ... one row per prompt (diffalign.data.schema)
    manifest/rank-0.jsonl      one line per shard a process finished (after its file was renamed in)
    summary.json, summary.md   score distributions per scorer, scorer agreement, per-generator means

Work is planned as global shards (shard s = rows [s*S, (s+1)*S) of the prompt list), so a shard's
content does not depend on how many processes run: the pending shards are split between processes with
accelerate's `PartialState().split_between_processes`, each process writes its own shards (temp file +
rename) and appends to its own manifest. A shard is done when the manifests list it and its file
exists; a restart redoes every other shard from scratch (deterministic seeds: image j of row i has seed
`seed + i*k + j`), so a killed run resumes with no duplicate and no missing row.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffalign.atomic import atomic_path, remove_temps, write_atomic
from diffalign.data.phi import ranks_from_phi, soft_preference
from diffalign.lazy import load_attr
from diffalign.synpic.config import ConfigError, SynPicConfig
from diffalign.synpic.generators import GENERATORS

SHARD_PATTERN = "shard-{:05d}.parquet"

#: prompt sources that are a function returning the prompt list ("package.module:attr", imported when used)
PROMPT_FUNCTIONS = {"toy": "diffalign.toy.world:all_prompts"}


# --- prompts ----------------------------------------------------------------------------------------


def load_prompts(cfg: SynPicConfig) -> list[str]:
    """The run's prompt list: one entry per output row (after dedupe, limit and repeats)."""
    p = cfg.prompts
    if p.source in PROMPT_FUNCTIONS:
        prompts = load_attr(PROMPT_FUNCTIONS[p.source])()
    elif p.source == "list":
        prompts = list(p.items or [])
    elif p.source == "file" and Path(p.path).suffix == ".txt":
        prompts = Path(p.path).read_text().splitlines()
    else:
        import datasets

        if p.source == "file":
            ext = Path(p.path).suffix.lstrip(".")
            ds = datasets.load_dataset({"jsonl": "json"}.get(ext, ext), data_files=p.path, split="train")
        else:
            ds = datasets.load_dataset(p.path, split=p.split)
        if p.column not in ds.column_names:
            raise ConfigError(f"prompts.column {p.column!r} not in {ds.column_names}")
        prompts = ds[p.column]
    prompts = [str(x).strip() for x in prompts if x is not None and str(x).strip()]
    if p.dedupe:
        prompts = list(dict.fromkeys(prompts))
    if p.limit is not None:
        prompts = prompts[: p.limit]
    if not prompts:
        raise ConfigError("the prompt source gave no prompts")
    return prompts * p.repeats


# --- building blocks --------------------------------------------------------------------------------


def build_generators(cfg: SynPicConfig) -> list:
    return [load_attr(GENERATORS[g.type])(**g.model_dump(exclude={"type"})) for g in cfg.generators]


def build_scorers(cfg: SynPicConfig) -> list:
    from diffalign.rewards import create_scorer

    return [create_scorer(s.name, **s.kwargs) for s in cfg.scorers]


def encode_image(image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper())
    return buf.getvalue()


def arrow_schema(scorer_names: Sequence[str]):
    import pyarrow as pa

    return pa.schema(
        [
            ("prompt", pa.string()),
            ("images", pa.list_(pa.binary())),
            ("generators", pa.list_(pa.string())),
            ("seeds", pa.list_(pa.int64())),
            ("scores", pa.struct([(n, pa.list_(pa.float64())) for n in scorer_names])),
            ("phi", pa.list_(pa.float64())),
            ("rank", pa.list_(pa.int32())),
        ]
    )


def make_rows(
    prompts: Sequence[str], row_ids: Sequence[int], generators: Sequence, scorers: Sequence, cfg: SynPicConfig
) -> dict[str, list]:
    """Generate, score and rank the rows `row_ids` (their prompts given); returns columns."""
    k = sum(getattr(g, "images_per_prompt", 1) for g in generators)
    n_rows = len(prompts)
    images: list[list] = [[None] * k for _ in range(n_rows)]
    seeds = [[cfg.seed + r * k + j for j in range(k)] for r in row_ids]
    names: list[str] = []
    col = 0
    for g in generators:
        m = getattr(g, "images_per_prompt", 1)
        gp = [p for p in prompts for _ in range(m)]
        gs = [seeds[i][col + j] for i in range(n_rows) for j in range(m)]
        out = g.generate(gp, gs)
        if len(out) != len(gp):
            raise RuntimeError(f"generator {g.name!r} returned {len(out)} images for {len(gp)} requests")
        for idx, im in enumerate(out):
            images[idx // m][col + idx % m] = im.convert("RGB")
        names += [g.name] * m
        col += m
    flat = [im for row in images for im in row]
    flat_prompts = [p for p in prompts for _ in range(k)]
    raw = np.stack(
        [s.score(flat, flat_prompts).double().numpy().reshape(n_rows, k) for s in scorers], 1
    )  # [R, n, k]
    hib = [getattr(s, "higher_is_better", True) for s in scorers]
    phi = soft_preference(raw, hib)
    rank = ranks_from_phi(phi)
    return {
        "prompt": list(prompts),
        "images": [[encode_image(im, cfg.image_format) for im in row] for row in images],
        "generators": [list(names) for _ in range(n_rows)],
        "seeds": seeds,
        "scores": [{s.name: raw[i, j].tolist() for j, s in enumerate(scorers)} for i in range(n_rows)],
        "phi": phi.tolist(),
        "rank": rank.tolist(),
    }


def write_shard(columns: dict[str, list], path: Path, scorer_names: Sequence[str], metadata: dict) -> None:
    """Write one shard atomically (diffalign.atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(scorer_names).with_metadata({b"diffalign.synpic": json.dumps(metadata).encode()})
    table = pa.Table.from_pydict(columns, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifests(out: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    for f in sorted((out / "manifest").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if (out / "data" / entry["file"]).exists():
                done[int(entry["shard"])] = entry
    return done


def read_run_file(path: Path) -> dict:
    """The run.json of an output directory; a clear ConfigError when it cannot be read (an older version
    wrote it non-atomically, so a kill could leave it empty)."""
    try:
        previous = json.loads(path.read_text())
    except ValueError:  # not JSON, not UTF-8
        previous = None
    if not isinstance(previous, dict) or "fingerprint" not in previous:
        raise ConfigError(f"{path} is empty or unreadable (a killed run?); rerun with --overwrite to start over")
    return previous


def fingerprint(cfg: SynPicConfig, prompts: Sequence[str]) -> dict:
    config = cfg.model_dump(mode="json", exclude={"output_dir"})
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    h.update("\n".join(prompts).encode())
    return {"fingerprint": h.hexdigest()[:16], "rows": len(prompts), "config": config}


# --- the run ----------------------------------------------------------------------------------------


def process_state():
    """accelerate's PartialState; on a machine without CUDA (or with ACCELERATE_USE_CPU=true) it is
    created with cpu=True so that several launched processes join a gloo process group. Refuses to run
    when several processes were launched but did not form a group (each would redo every shard)."""
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        raise RuntimeError(
            f"WORLD_SIZE={world} but accelerate formed a group of {state.num_processes}; refusing to run "
            "(every process would write every shard)"
        )
    return state


def run(
    cfg: SynPicConfig,
    generators: Sequence | None = None,
    scorers: Sequence | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict | None:
    """Generate the dataset of `cfg` into cfg.output_dir, resuming what is there. Returns the summary on
    the main process (None elsewhere). `generators` / `scorers` replace the configured ones (tests)."""
    from tqdm.auto import tqdm

    state = process_state()
    out = Path(cfg.output_dir)
    prompts = load_prompts(cfg)
    fp = fingerprint(cfg, prompts)
    shard_size = cfg.shard_size
    num_shards = math.ceil(len(prompts) / shard_size)
    run_file = out / "run.json"
    if state.is_main_process:
        (out / "data").mkdir(parents=True, exist_ok=True)
        (out / "manifest").mkdir(exist_ok=True)
        if overwrite:
            for f in [*(out / "data").glob("*.parquet"), *(out / "manifest").glob("*.jsonl"), run_file]:
                f.unlink(missing_ok=True)
        for folder in (out, out / "data", out / "manifest"):  # temp files of a killed run
            remove_temps(folder)
        for f in (out / "manifest").glob("rank-*.jsonl"):  # drop a line cut by a kill
            text = f.read_text()
            if text and not text.endswith("\n"):
                write_atomic(f, text[: text.rfind("\n") + 1])
        if not run_file.exists():
            write_atomic(run_file, json.dumps(fp | {"num_shards": num_shards}, indent=1))
    state.wait_for_everyone()
    previous = read_run_file(run_file)
    if previous["fingerprint"] != fp["fingerprint"]:
        raise ConfigError(
            f"{out} holds a different Syn-Pic run (fingerprint {previous['fingerprint']} != {fp['fingerprint']}); "
            "use a new output dir or --overwrite"
        )
    done = read_manifests(out)
    pending = [s for s in range(num_shards) if s not in done]
    state.wait_for_everyone()  # every process has read the same state before anyone writes

    gens = list(generators) if generators is not None else build_generators(cfg)
    scs = list(scorers) if scorers is not None else build_scorers(cfg)
    names = [s.name for s in scs]
    k = sum(getattr(g, "images_per_prompt", 1) for g in gens)
    manifest = out / "manifest" / f"rank-{state.process_index}.jsonl"
    t0 = time.perf_counter()
    rows_done = 0
    with state.split_between_processes(pending) as mine:
        bar = tqdm(total=len(mine) * 1, unit="shard", disable=not (progress and state.is_main_process),
                   desc=f"synpic (process 0 of {state.num_processes})")  # fmt: skip
        for s in mine:
            lo, hi = s * shard_size, min((s + 1) * shard_size, len(prompts))
            cols = make_rows(prompts[lo:hi], list(range(lo, hi)), gens, scs, cfg)
            name = SHARD_PATTERN.format(s)
            write_shard(
                cols,
                out / "data" / name,
                names,
                {"shard": s, "rows": [lo, hi], "fingerprint": fp["fingerprint"]},
            )
            entry = {"shard": s, "file": name, "rows": hi - lo, "first_row": lo, "k": k,
                     "process": state.process_index, "time": time.time()}  # fmt: skip
            with manifest.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            rows_done += hi - lo
            bar.update(1)
        bar.close()
    elapsed = time.perf_counter() - t0
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    from diffalign.synpic.summary import summarize, write_summary

    summary = summarize(shard_files(out), names)
    summary["run"] = {
        "rows": len(prompts),
        "k": k,
        "n": len(names),
        "shards": num_shards,
        "shards_this_run": len(pending),
        "processes": state.num_processes,
        "seconds_this_run": round(elapsed, 3),
        "rows_per_second_main_process": round(rows_done / elapsed, 2) if elapsed > 0 and rows_done else None,
    }
    write_summary(summary, out)
    return summary


def shard_files(out: str | Path) -> list[str]:
    """The finished shard files of a Syn-Pic output directory, in row order."""
    return [str(p) for p in sorted((Path(out) / "data").glob("shard-*.parquet"))]
