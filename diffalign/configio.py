"""Config files: a YAML file (or a dict) plus dotted `key=value` overrides, validated by a pydantic model.

One loader for every config diffalign reads (training: diffalign.config; Syn-Pic: diffalign.synpic.config).
`a.b.0.c=value` sets a nested key, `0` indexing a list; the value is parsed as YAML, so numbers, booleans,
lists and null work. A config that cannot be used raises ConfigError with one line per problem: an unknown
key names the closest valid key as a full dotted path (through nested models, lists and tagged unions,
e.g. `Did you mean 'generators.1.steps'?`) and the keys valid there; a wrong value says which key and
what was given.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic
import yaml

from diffalign.errors import UserError

M = TypeVar("M", bound=pydantic.BaseModel)


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message says what to fix."""


# ---- reading and overriding ----------------------------------------------------------------------


def read_tree(source: str | Path | dict) -> dict:
    """The config as plain nested dicts / lists: a copy of a dict, or a YAML file's mapping."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    from diffalign.data.sources import read_utf8_text

    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:  # safe_load: a tag naming Python code (!!python/object...) is an error, never run
        tree = yaml.safe_load(read_utf8_text(path, error=ConfigError)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping")
    return tree


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1` -> ("a.b", 1); values are parsed as YAML (an empty value is the empty string)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return out


def parse_cli(parser, argv: list[str] | None):
    """`parser.parse_args` for commands that take `key.path=value` overrides (a positional with
    nargs="*"): the overrides may come before, between or after the flags. A dotted key written as an
    option (`--train.max_steps=4`) is a ConfigError saying how to write it."""
    argv = list(argv or [])
    known = {s for action in parser._actions for s in action.option_strings}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name.startswith("-") and name not in known and "." in name:
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value = argv[i + 1]
            raise ConfigError(f"unknown option {arg!r}: overrides take no dashes; write {name.lstrip('-')}={value or '...'}")
    return parser.parse_intermixed_args(argv)


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set each `a.b.0.c=value` in `tree` (in place; returned). Missing or null sections are created;
    a list index must exist."""
    for key, value in parse_overrides(overrides):
        parts = key.split(".")
        node: Any = tree
        for i, part in enumerate(parts):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
                slot: Any = int(part)
            elif isinstance(node, dict):
                slot = part
            else:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a section")
            if i == len(parts) - 1:
                node[slot] = value
                break
            child = node.get(slot) if isinstance(node, dict) else node[slot]
            if child is None:
                node[slot] = child = {}
            node = child
    return tree


def load(model: type[M], source: str | Path | dict, overrides: list[str] | None = None, what: str = "config") -> M:
    """Read `source`, apply `overrides`, validate against `model`; ConfigError names what is wrong."""
    tree = apply_overrides(read_tree(source), list(overrides or []))
    try:
        return model.model_validate(tree)
    except pydantic.ValidationError as err:
        where = "" if isinstance(source, dict) else f"{source}: "
        raise ConfigError(where + format_validation_error(err, model, what)) from None


# ---- readable errors ------------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_member_tag(model: type[pydantic.BaseModel], part: str) -> bool:
    """A location part naming this member of a union: its discriminator value or its class name."""
    if model.__name__ == part:
        return True
    return any(
        typing.get_origin(f.annotation) is Literal and part in typing.get_args(f.annotation)
        for f in model.model_fields.values()
    )


def _walk(model: type[pydantic.BaseModel], loc: tuple) -> tuple[list[str], list[type[pydantic.BaseModel]]]:
    """A pydantic error location -> (the dotted key a user writes, the models that can sit there).
    Union selectors (a discriminator tag, a class name, pydantic's function-/tagged- wrappers) are not keys."""
    shown: list[str] = []
    models = [model]
    for part in loc:
        if isinstance(part, int):
            shown.append(str(part))
            continue
        if part.startswith(("function-", "tagged-")):
            continue
        if len(models) > 1 and any(_is_member_tag(m, part) for m in models):
            models = [m for m in models if _is_member_tag(m, part)]
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        shown.append(part)
        if fields:
            models = [m for f in fields for m in _models_in(f.annotation)]
    return shown, models


def _closest(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return close[0] if close else None


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(e: dict, model: type[pydantic.BaseModel]) -> str:
    loc = tuple(e["loc"])
    if e["type"] == "extra_forbidden":
        shown, models = _walk(model, loc[:-1])
        valid = sorted({f for m in models for f in m.model_fields})
        key = ".".join([*shown, str(loc[-1])])
        close = _closest(str(loc[-1]), valid)
        hint = f" Did you mean {'.'.join([*shown, close])!r}?" if close else ""
        return f"unknown key {key!r}.{hint} Valid keys here: {', '.join(valid)}"
    where = ".".join(_walk(model, loc)[0])
    if e["type"] == "missing":
        return f"missing required key {where!r}"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    if e["type"] in ("literal_error", "union_tag_invalid"):  # a misspelt choice: name the closest one
        ctx = e.get("ctx", {})
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", ctx.get("expected_tags", ""))))
        close = _closest(str(ctx.get("tag", got)), choices)
        msg += f". Did you mean {close!r}?" if close else ""
    got_s = f" (got {_short_repr(got)})" if got is not None and not isinstance(got, dict) else ""
    if where and msg.startswith(f"{where}."):  # a section's validator already named the nested key
        return msg
    return f"{where}: {msg}{got_s}" if where else msg


def format_validation_error(err: pydantic.ValidationError, model: type[pydantic.BaseModel], what: str = "config") -> str:
    """One problem: one line; several: one line each under a header."""
    problems = [_describe(e, model) for e in err.errors()]
    if len(problems) == 1:
        return f"invalid {what}: {problems[0]}"
    return f"invalid {what}:\n" + "\n".join(f"- {p}" for p in problems)
