"""Benchmark suites: a YAML file naming a prompt source, the generation protocol and published anchors.

    name: my-suite
    prompts:                       # one source, or a list of sources (each may carry a `group`)
      type: file                   # file | hf | hf_file | geneval (| callable, only with allow_code)
      path: prompts.txt            # relative to the suite file; .txt (one per line) or .jsonl ("prompt" key)
    images_per_prompt: 4
    seeds: {base: 42, scheme: shared}   # shared: image k of every prompt uses base + k
                                        # unique: image k of prompt i uses base + i * images_per_prompt + k
    sampler: default               # default (the pipeline's own) | ddim | pndm | ddpm | euler | euler_a | dpmsolver++
    steps: 50
    guidance: 7.5
    resolution: null               # null (the model's default), an int, or [height, width]
    scorers: [pickscore, hps]      # defaults for --scorers
    metrics: []                    # [geneval] runs the GenEval detector rules on the images
    anchors: {...}                 # published numbers, free-form, for sanity checks

Suites shipped with diffalign live in `eval/suites/`; `load_suite("geneval")` finds them by name.

A suite file is data. The two fields that name Python code, a `callable` prompt source and a
`package.module:factory` entry in `scorers`, import and run that code, so `load_suite` refuses them unless
the caller passes `allow_code=True` (`diffalign eval --allow-code-in-suites`).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SUITES_DIR = Path(__file__).resolve().parents[2] / "eval" / "suites"
ALLOW_CODE_FLAG = "--allow-code-in-suites"
SAMPLERS = ("default", "ddim", "pndm", "ddpm", "euler", "euler_a", "dpmsolver++", "unipc")


class SuiteError(ValueError):
    """A suite file that does not validate, or a prompt source that cannot be read."""


@dataclass
class PromptItem:
    index: int  # position in the full suite (stable under --limit; names the image folder)
    prompt: str
    metadata: dict = field(default_factory=dict)  # written to <index>/metadata.jsonl; always has "prompt"
    group: str | None = None


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group: str | None = None  # label for every prompt of this source (e.g. an HPS style)


class FileSource(_Source):
    type: Literal["file"]
    path: str
    field: str = "prompt"  # key holding the prompt in a .jsonl file


class HFSource(_Source):
    type: Literal["hf"]
    dataset: str  # hub id or local folder (load_dataset, or load_from_disk for a saved dataset)
    split: str = "train"
    column: str = "prompt"
    name: str | None = None  # dataset config
    data_files: str | list[str] | dict[str, Any] | None = None
    group_column: str | None = None
    unique: bool = False  # drop repeated prompts, keeping the first


class HFFileSource(_Source):
    type: Literal["hf_file"]
    repo: str  # hub dataset repo id
    filename: str  # a JSON list of prompt strings inside it
    repo_type: str = "dataset"


class GenEvalSource(_Source):
    type: Literal["geneval"]
    seed: int = 43
    per_task: int = 100


class CallableSource(_Source):
    """Runs Python code: `load_suite` refuses it unless called with allow_code=True."""

    type: Literal["callable"]
    target: str  # "package.module:function" returning a list of str or of dicts with a "prompt" key
    kwargs: dict[str, Any] = Field(default_factory=dict)


Source = Annotated[FileSource | HFSource | HFFileSource | GenEvalSource | CallableSource, Field(discriminator="type")]


class Seeds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: int = 42
    scheme: Literal["shared", "unique"] = "shared"


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    prompts: list[Source]
    images_per_prompt: int = Field(1, ge=1)
    seeds: Seeds = Seeds()
    sampler: str = "default"
    steps: int = Field(50, ge=1)
    guidance: float = Field(7.5, ge=0)
    resolution: int | tuple[int, int] | None = None
    negative_prompt: str | None = None
    scorers: list[str] = Field(default_factory=list)
    metrics: list[Literal["geneval"]] = Field(default_factory=list)
    anchors: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None  # where it was loaded from (set by the loader)

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, dict) else v

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v):
        if v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; choose one of {', '.join(SAMPLERS)}")
        return v

    @property
    def height_width(self) -> tuple[int | None, int | None]:
        if self.resolution is None:
            return None, None
        if isinstance(self.resolution, int):
            return self.resolution, self.resolution
        return tuple(self.resolution)

    def seed_for(self, index: int, k: int) -> int:
        if self.seeds.scheme == "shared":
            return self.seeds.base + k
        return self.seeds.base + index * self.images_per_prompt + k

    def load_prompts(self, limit: int | None = None) -> list[PromptItem]:
        items: list[PromptItem] = []
        base = Path(self.path).parent if self.path else Path.cwd()
        for src in self.prompts:
            for entry in _read_source(src, base):
                meta = dict(entry) if isinstance(entry, dict) else {"prompt": entry}
                group = meta.pop("_group", None) or src.group
                if group is not None and "group" not in meta and src.type != "geneval":
                    meta["group"] = group
                items.append(PromptItem(len(items), meta["prompt"], meta, group if src.type != "geneval" else meta.get("tag")))
        if not items:
            raise SuiteError(f"suite {self.name!r}: its prompt source gave no prompts")
        return items[:limit] if limit else items


def _read_source(src, base: Path) -> list:
    if src.type == "file":
        path = Path(src.path) if Path(src.path).is_absolute() else base / src.path
        if not path.is_file():
            raise SuiteError(f"prompt file {str(path)!r} not found")
        return read_prompt_file(path, src.field)
    if src.type == "geneval":
        from diffalign.evaluation.geneval_prompts import generate_geneval_metadata

        return generate_geneval_metadata(src.seed, src.per_task)
    if src.type == "callable":
        module, _, attr = src.target.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise SuiteError(f"prompt source {src.target!r} cannot be imported: {e}") from e
        out = list(fn(**src.kwargs))
        for x in out:
            if not isinstance(x, str) and not (isinstance(x, dict) and "prompt" in x):
                raise SuiteError(f"{src.target} must return strings or dicts with a 'prompt' key, got {x!r}")
        return out
    if src.type == "hf_file":
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(src.repo, src.filename, repo_type=src.repo_type)
        except Exception as e:  # offline, missing repo or file
            raise SuiteError(f"could not fetch {src.filename} from {src.repo}: {e}") from e
        try:
            data = json.loads(_read_text(Path(path)))
        except json.JSONDecodeError as e:
            raise SuiteError(f"{src.filename} from {src.repo}: not valid JSON: {e}") from e
        return [x if isinstance(x, str) else x["prompt"] for x in data]
    if src.type == "hf":
        return _read_hf(src)
    raise SuiteError(f"unknown prompt source type {src.type!r}")  # pragma: no cover


def _read_hf(src: HFSource) -> list:
    import datasets

    try:
        if Path(src.dataset).is_dir() and (Path(src.dataset) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(src.dataset)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.dataset, src.name, split=src.split, data_files=src.data_files)
    except Exception as e:
        raise SuiteError(f"could not load dataset {src.dataset!r} split {src.split!r}: {e}") from e
    if src.column not in ds.column_names:
        raise SuiteError(f"dataset {src.dataset!r} has no column {src.column!r} (columns: {', '.join(ds.column_names)})")
    cols = [src.column] + ([src.group_column] if src.group_column else [])
    ds = ds.select_columns(cols)
    out, seen = [], set()
    for row in ds:
        p = row[src.column]
        if src.unique and p in seen:
            continue
        seen.add(p)
        out.append({"prompt": p, "_group": row[src.group_column]} if src.group_column else p)
    return out


def _read_text(path: Path) -> str:
    from diffalign.data.sources import read_utf8_text

    return read_utf8_text(path, error=SuiteError)


def read_prompt_file(path: str | Path, key: str = "prompt") -> list:
    """A .txt file (one prompt per non-empty line) or a .jsonl file (one object per line with `key`), in
    UTF-8. A file that is not UTF-8, a bad JSON line, or a file with no prompt is a one-line SuiteError."""
    path = Path(path)
    numbered = [(n, ln) for n, ln in enumerate(_read_text(path).splitlines(), 1) if ln.strip()]
    if not numbered:
        raise SuiteError(f"prompt file {str(path)!r} holds no prompts")
    if path.suffix == ".jsonl":
        out = []
        for n, ln in numbered:
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as err:
                raise SuiteError(f"{path}:{n}: not valid JSON: {err}") from err
            if not isinstance(obj, dict):
                raise SuiteError(f"{path}:{n}: expected a JSON object with a {key!r} key, got {type(obj).__name__}")
            if key not in obj:
                raise SuiteError(f"{path}:{n}: no {key!r} key")
            if key != "prompt":
                obj = {"prompt": obj[key], **{k: v for k, v in obj.items() if k != key}}
            out.append(obj)
        return out
    return [ln for _, ln in numbered]


def suite_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("DIFFALIGN_SUITES", "").split(os.pathsep) if p]
    return extra + [SUITES_DIR]


def available_suites() -> list[str]:
    return sorted({p.stem for d in suite_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def code_in_suite(suite: Suite) -> list[str]:
    """The import paths a suite would run: `callable` prompt targets and `module:factory` scorers."""
    return [s.target for s in suite.prompts if s.type == "callable"] + [s for s in suite.scorers if ":" in s]


def load_suite(name_or_path: str | Path, allow_code: bool = False) -> Suite:
    """Load a suite by file path or by name (looked up in $DIFFALIGN_SUITES, then eval/suites/).

    A suite that names Python code (a `callable` prompt source, a `module:factory` scorer) is refused
    unless `allow_code` is True: suite files are data, and loading one must not run code."""
    path = Path(name_or_path)
    if not path.is_file():
        found = [d / f"{name_or_path}.yaml" for d in suite_dirs() if (d / f"{name_or_path}.yaml").is_file()]
        if not found:
            raise SuiteError(f"no suite {str(name_or_path)!r}: not a file and not one of {', '.join(available_suites())}")
        path = found[0]
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite file must be a mapping")
    data["path"] = str(path.resolve())
    try:
        suite = Suite.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'suite'}: {err['msg']}" for err in e.errors())
        raise SuiteError(f"{path}: invalid suite: {problems}") from e
    code = code_in_suite(suite)
    if code and not allow_code:
        raise SuiteError(
            f"{path}: the suite names Python code to import and run ({', '.join(code)}); suites are data, so "
            f"this is refused: pass {ALLOW_CODE_FLAG} to diffalign eval if you trust this file"
        )
    return suite
