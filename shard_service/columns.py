"""Column math of the shard service: one-pass statistics at ingest (moments of numeric
columns, category counts of string columns), vectorised in Arrow compute / numpy (never a
Python loop over rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# A string column with more distinct values than this is not categorical: its statistics
# carry no categories, and it cannot be index- or one-hot-encoded.
MAX_CATEGORIES = 1024


def is_numeric(type_: pa.DataType) -> bool:
    """Columns that get mean/std statistics and are scaled (booleans count as 0/1)."""
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)


def is_text(type_: pa.DataType) -> bool:
    """String columns, plain or dictionary-encoded: stored as categorical columns."""
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


CATEGORICAL = pa.dictionary(pa.int32(), pa.string())


def encode_categorical(column: pa.Array) -> pa.Array:
    """A string column as dictionary<int32, string>: how every text column is stored."""
    if column.type == CATEGORICAL:
        return column
    return pc.dictionary_encode(pc.cast(column, pa.string()))


@dataclass(frozen=True)
class ColumnStats:
    """Statistics of one column of a dataset version.

    `count` is the number of values that entered the moments; `nulls` counts Arrow nulls and,
    for floating columns, NaN. `std` is the POPULATION standard deviation (ddof=0, numpy's
    default). Non-numeric columns carry only count and nulls; min/max are None when a numeric
    column has no values.
    """

    name: str
    type: str
    count: int
    nulls: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None


class _Moments:
    """Running count/mean/M2/min/max, merged per batch (Chan et al.'s parallel update)."""

    __slots__ = ("count", "nulls", "mean", "m2", "min", "max")

    def __init__(self) -> None:
        self.count = 0
        self.nulls = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def update(self, column: pa.Array | pa.ChunkedArray) -> None:
        values = pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        present = values[~np.isnan(values)]  # nulls arrive as NaN here
        self.nulls += len(values) - len(present)
        n = len(present)
        if n == 0:
            return
        batch_mean = float(present.mean())
        batch_m2 = float(np.square(present - batch_mean).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, float(present.min()))
        self.max = max(self.max, float(present.max()))


class _Categories:
    """Running counts per distinct value of a categorical column, merged per batch from the
    dictionary's value counts; dropped once the column has too many values to be a category."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = {}

    def update(self, column: pa.DictionaryArray) -> None:
        if self.counts is None:
            return
        present = np.bincount(
            column.indices.drop_null().to_numpy(zero_copy_only=False),
            minlength=len(column.dictionary),
        )
        for value, count in zip(column.dictionary.to_pylist(), present.tolist(), strict=True):
            if count:
                self.counts[value] = self.counts.get(value, 0) + count
        if len(self.counts) > MAX_CATEGORIES:
            self.counts = None


class StatsAccumulator:
    """Per-column statistics of a stream of record batches, in one pass."""

    def __init__(self, schema: pa.Schema):
        self._schema = schema
        self._numeric = {f.name: _Moments() for f in schema if is_numeric(f.type)}
        self._categories = {f.name: _Categories() for f in schema if f.type == CATEGORICAL}
        self._count = dict.fromkeys(schema.names, 0)
        self._nulls = dict.fromkeys(schema.names, 0)

    def update(self, batch: pa.RecordBatch) -> None:
        for field, column in zip(self._schema, batch.columns, strict=True):
            moments = self._numeric.get(field.name)
            if moments is not None:
                moments.update(column)
                continue
            self._nulls[field.name] += column.null_count
            self._count[field.name] += len(column) - column.null_count
            categories = self._categories.get(field.name)
            if categories is not None:
                categories.update(column)

    def category_counts(self, name: str) -> dict[str, int] | None:
        """Each category's row count for a categorical column (None past the limit)."""
        return self._categories[name].counts

    def result(self) -> list[ColumnStats]:
        stats = []
        for field in self._schema:
            moments = self._numeric.get(field.name)
            if moments is None:
                counts = (
                    self._categories[field.name].counts if field.name in self._categories else None
                )
                stats.append(
                    ColumnStats(
                        field.name,
                        str(field.type),
                        self._count[field.name],
                        self._nulls[field.name],
                        categories=tuple(sorted(counts)) if counts is not None else None,
                    )
                )
                continue
            empty = moments.count == 0
            stats.append(
                ColumnStats(
                    name=field.name,
                    type=str(field.type),
                    count=moments.count,
                    nulls=moments.nulls,
                    mean=moments.mean,
                    std=math.sqrt(moments.m2 / moments.count) if not empty else 0.0,
                    min=None if empty else moments.min,
                    max=None if empty else moments.max,
                )
            )
        return stats


def binary_stats(name: str, nulls: int, counts: dict[str, int], classes: list[str]) -> ColumnStats:
    """Statistics of a two-class string column served as 0/1 (classes[1] is 1)."""
    negative, positive = (counts.get(c, 0) for c in classes)
    count = negative + positive
    share = positive / count
    return ColumnStats(
        name=name,
        type=str(pa.int8()),
        count=count,
        nulls=nulls,
        mean=share,
        std=math.sqrt(share * (1 - share)),
        min=0.0 if negative else 1.0,
        max=1.0 if positive else 0.0,
        categories=tuple(classes),
    )
