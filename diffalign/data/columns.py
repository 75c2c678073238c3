"""Arrow type checks of a preference source's columns: a missing or mistyped column is a DataFormatError
that names the column, its type and what was expected, before any row is read."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from diffalign.data.sources import DataFormatError, RowSource


def is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def is_image(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_text(t):  # bytes or a path
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0  # datasets Image {bytes, path}


def is_list_of(t: pa.DataType, pred) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and pred(
        t.value_type
    )


def is_scores(t: pa.DataType) -> bool:
    if is_list_of(t, is_number):
        return True
    return pa.types.is_struct(t) and all(
        is_list_of(t.field(i).type, is_number) for i in range(t.num_fields)
    )


def check_columns(src: RowSource, wanted: dict[str, tuple[str, Any, str]], fmt: str) -> None:
    """wanted: role -> (column, type predicate, expected description). Missing first, then types."""
    found = src.column_names
    missing = [col for col, _, _ in wanted.values() if col not in found]
    if missing:
        raise DataFormatError(
            f"{fmt} source {src.description}: missing column(s) {missing}; found columns {found}. "
            "Rename through data.columns (role -> column) if they are called differently."
        )
    for col, pred, expected in wanted.values():
        t = src.schema.field(col).type
        if not pred(t):
            raise DataFormatError(
                f"{fmt} source {src.description}: column {col!r} has type {t}, expected {expected}"
            )
