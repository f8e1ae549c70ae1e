"""Column math of the shard service: one-pass statistics at ingest and standardisation when
serving, both vectorised in Arrow compute / numpy (never a Python loop over rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def is_numeric(type_: pa.DataType) -> bool:
    """Columns that get mean/std statistics and are standardised (booleans count as 0/1)."""
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)


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


class StatsAccumulator:
    """Per-column statistics of a stream of record batches, in one pass."""

    def __init__(self, schema: pa.Schema):
        self._schema = schema
        self._numeric = {f.name: _Moments() for f in schema if is_numeric(f.type)}
        self._count = dict.fromkeys(schema.names, 0)
        self._nulls = dict.fromkeys(schema.names, 0)

    def update(self, batch: pa.RecordBatch) -> None:
        for field, column in zip(self._schema, batch.columns, strict=True):
            moments = self._numeric.get(field.name)
            if moments is not None:
                moments.update(column)
            else:
                self._nulls[field.name] += column.null_count
                self._count[field.name] += len(column) - column.null_count

    def result(self) -> list[ColumnStats]:
        stats = []
        for field in self._schema:
            moments = self._numeric.get(field.name)
            if moments is None:
                stats.append(
                    ColumnStats(
                        field.name,
                        str(field.type),
                        self._count[field.name],
                        self._nulls[field.name],
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


def standardize(column: pa.ChunkedArray | pa.Array, mean: float, std: float) -> pa.ChunkedArray:
    """(x - mean) / std as float32; a constant column (std == 0) is only centered."""
    values = pc.subtract(pc.cast(column, pa.float64(), safe=False), pa.scalar(mean))
    if std > 0:
        values = pc.divide(values, pa.scalar(std))
    return pc.cast(values, pa.float32(), safe=False)
