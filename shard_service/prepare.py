"""Server-side preprocessing of a shard for one read: row filter, projection, then per column
impute → clip at k·σ → scale (standard or min-max) for numeric columns and index or one-hot
encoding for categorical ones, all with the dataset version's statistics and all in Arrow
compute kernels (no Python per row).

The filter is evaluated over the stored values (a two-class target already as 0/1), so a
filter reads in the units the data was ingested in, whatever the preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onehop.errors import InvalidArgument
from shard_service.columns import CATEGORICAL, ColumnStats, is_numeric

if TYPE_CHECKING:
    from shard_service.catalog import DatasetInfo

SCALINGS = ("none", "standard", "minmax")
IMPUTATIONS = ("none", "mean", "zero")
ENCODINGS = ("keep", "index", "one_hot")
# One-hot makes a column per category: past this, ask for the index encoding instead.
MAX_ONE_HOT = 256


@dataclass(frozen=True)
class Prep:
    """How a shard is prepared for one read. Passthrough columns are left as stored."""

    columns: tuple[str, ...] = ()
    scaling: str = "none"
    passthrough: tuple[str, ...] = ()
    clip_sigma: float = 0.0
    impute: str = "none"
    categorical: str = "keep"
    filter: pc.Expression | None = None
    # Every column the filter reads (checked against the dataset, read with the shard).
    filter_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.scaling, SCALINGS, "scaling"),
            (self.impute, IMPUTATIONS, "impute"),
            (self.categorical, ENCODINGS, "categorical encoding"),
        ):
            if value not in allowed:
                raise InvalidArgument(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")

    @property
    def numeric_transform(self) -> bool:
        """Whether numeric columns change (and so are served as float32)."""
        return self.scaling != "none" or self.clip_sigma > 0 or self.impute != "none"

    @property
    def identity(self) -> bool:
        """Whether the shard is served as stored: every column, every row, nothing changed."""
        return (
            not self.columns
            and self.filter is None
            and not self.numeric_transform
            and self.categorical == "keep"
        )


def output_columns(info: DatasetInfo, prep: Prep) -> list[str]:
    """The projection, checked against the dataset: names, duplicates, options."""
    names = info.logical_schema.names
    known = set(names)
    for column in (*prep.columns, *prep.passthrough, *prep.filter_columns):
        if column not in known:
            raise InvalidArgument(
                f"dataset {info.name!r} v{info.version} has no column {column!r}; "
                f"columns: {', '.join(names)}"
            )
    if len(set(prep.columns)) != len(prep.columns):
        raise InvalidArgument("a column is named twice in the projection")
    if prep.clip_sigma < 0:
        raise InvalidArgument(f"clip_sigma must be >= 0, got {prep.clip_sigma}")
    return list(prep.columns) or names


def prepared_schema(info: DatasetInfo, prep: Prep) -> pa.Schema:
    """The schema a read with `prep` produces (no data is read)."""
    schema = info.logical_schema
    keep = set(prep.passthrough)
    fields: list[pa.Field] = []
    for name in output_columns(info, prep):
        field = schema.field(name)
        if name in keep:
            fields.append(field)
        elif is_numeric(field.type) and prep.numeric_transform:
            fields.append(pa.field(name, pa.float32(), nullable=field.nullable))
        elif field.type == CATEGORICAL and prep.categorical == "index":
            _categories(info.column(name), prep)
            fields.append(pa.field(name, pa.int32(), nullable=False))
        elif field.type == CATEGORICAL and prep.categorical == "one_hot":
            fields.extend(
                pa.field(f"{name}={category}", pa.float32(), nullable=False)
                for category in _categories(info.column(name), prep)
            )
        else:
            fields.append(field)
    return pa.schema(fields)


def prepare(table: pa.Table, info: DatasetInfo, prep: Prep) -> pa.Table:
    """A shard as stored (logical types, at least the projection and filter columns) → the
    rows and columns of `prepared_schema(info, prep)`."""
    if prep.identity:
        return table
    schema = prepared_schema(info, prep)
    if prep.filter is not None:
        table = table.filter(prep.filter)
    keep = set(prep.passthrough)
    columns: list[pa.ChunkedArray] = []
    for name in output_columns(info, prep):
        column = table.column(name)
        if name in keep:
            columns.append(column)
        elif is_numeric(column.type) and prep.numeric_transform:
            columns.append(_numeric(column, info.column(name), prep))
        elif column.type == CATEGORICAL and prep.categorical != "keep":
            index = _category_index(column, _categories(info.column(name), prep))
            if prep.categorical == "index":
                columns.append(index)
            else:
                count = len(info.column(name).categories or ())
                columns.extend(
                    pc.cast(pc.equal(index, pa.scalar(k, pa.int32())), pa.float32())
                    for k in range(count)
                )
        else:
            columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _categories(stats: ColumnStats, prep: Prep) -> tuple[str, ...]:
    if stats.categories is None:
        raise InvalidArgument(
            f"column {stats.name!r} has too many distinct values to encode as categories"
        )
    if prep.categorical == "one_hot" and len(stats.categories) > MAX_ONE_HOT:
        raise InvalidArgument(
            f"column {stats.name!r} has {len(stats.categories)} categories, more than "
            f"{MAX_ONE_HOT} one-hot columns: use the index encoding"
        )
    return stats.categories


def _category_index(column: pa.ChunkedArray, categories: tuple[str, ...]) -> pa.ChunkedArray:
    """int32 position of each value in `categories`; -1 for missing or unknown. Looked up
    once per chunk's dictionary, then gathered by the chunk's indices."""
    value_set = pa.array(categories, pa.string())
    chunks = []
    for chunk in column.chunks:
        positions = pc.index_in(chunk.dictionary, value_set=value_set)
        chunks.append(pc.take(positions, chunk.indices))
    gathered = pa.chunked_array(chunks, pa.int32())
    return pc.fill_null(gathered, pa.scalar(-1, pa.int32()))


def _numeric(column: pa.ChunkedArray, stats: ColumnStats, prep: Prep) -> pa.ChunkedArray:
    # float32 data is prepared in float32 (what it is served as: no widening pass); other
    # numbers in float64, then narrowed once.
    kind = pa.float32() if column.type == pa.float32() else pa.float64()
    values = pc.cast(column, kind, safe=False)
    mean, std = stats.mean or 0.0, stats.std or 0.0
    if prep.impute != "none" and stats.nulls:
        fill = mean if prep.impute == "mean" else 0.0
        missing = pc.is_null(values, nan_is_null=True)
        values = pc.if_else(missing, pa.scalar(fill, kind), values)
    bounds = None
    if prep.clip_sigma > 0 and std > 0:
        bounds = (mean - prep.clip_sigma * std, mean + prep.clip_sigma * std)
    offset, scale = 0.0, 1.0
    if prep.scaling == "standard":
        offset, scale = mean, std
    elif prep.scaling == "minmax" and stats.min is not None and stats.max is not None:
        offset, scale = stats.min, stats.max - stats.min
    return _clip_affine(values, bounds, offset, scale)


def _clip_affine(
    values: pa.ChunkedArray, bounds: tuple[float, float] | None, offset: float, scale: float
) -> pa.ChunkedArray:
    """float32 (clip(x, *bounds) - offset) / scale; a constant column (scale == 0) is only
    shifted. One contiguous array for the column, allocated from Arrow's pool (which keeps
    its pages: a fresh malloc of that size faults every page in, which cost more than the
    arithmetic), filled chunk by chunk and updated in place by numpy, which releases the
    GIL. Arrow's kernels would allocate and pass over the data once per step, and a few
    calls per column, not per chunk, keep a shard of many columns from being bound by the
    interpreter. NaN stays NaN, and nulls are put back from the validity."""
    dtype = np.dtype(values.type.to_pandas_dtype())
    out = np.frombuffer(pa.allocate_buffer(len(values) * dtype.itemsize), dtype)
    start = 0
    for chunk in values.chunks:
        part = out[start : start + len(chunk)]
        start += len(chunk)
        source = chunk.to_numpy(zero_copy_only=False)
        # Every step on one chunk while it is in the CPU's cache.
        if bounds is not None:
            np.clip(source, bounds[0], bounds[1], out=part)
        else:
            part[...] = source
        if offset:
            np.subtract(part, offset, out=part)
        if scale > 0 and scale != 1.0:
            np.multiply(part, 1.0 / scale, out=part)
    mask = values.is_null().to_numpy() if values.null_count else None
    result = pa.array(out, mask=mask)
    if result.type != pa.float32():
        result = pc.cast(result, pa.float32(), safe=False)
    return pa.chunked_array([result])
