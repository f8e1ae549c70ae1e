"""Where training data comes from, without any transport: the `DataAccess` protocol a job
reads through, the dataset descriptions it validates against, and `TableData`, an Arrow
table in memory split into shards (tests, local files, torchrun without a mesh, the GPU
check). `trainer_service.jobs.FlightData` is the data plane's implementation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onehop.errors import NotFound
from shard_service.columns import is_numeric


@dataclass(frozen=True)
class ShardSource:
    """One shard of the training data: its row count (for step totals) and its reader."""

    shard: int
    rows: int
    read: Callable[[], pa.Table]

    @classmethod
    def from_table(cls, shard: int, table: pa.Table) -> ShardSource:
        return cls(shard=shard, rows=table.num_rows, read=lambda: table)


@dataclass(frozen=True)
class ColumnSummary:
    name: str
    type: str = ""
    count: int = 0
    nulls: int = 0
    mean: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class DatasetDescription:
    name: str
    version: int
    rows: int
    shard_rows: dict[int, int]
    columns: tuple[ColumnSummary, ...]


class DataAccess(Protocol):
    def describe(self, dataset: str, version: int) -> DatasetDescription: ...

    def open(
        self, dataset: DatasetDescription, columns: Sequence[str], target: str
    ) -> contextlib.AbstractContextManager[list[ShardSource]]:
        """The shards of `dataset`, projected to `columns`, features standardised with the
        version's statistics and `target` passed through; readers valid inside the block."""
        ...


def summarise(table: pa.Table, column: str) -> ColumnSummary:
    """Count, nulls, mean, population std, min and max of a numeric column (NaN = null)."""
    values = pc.cast(table.column(column), pa.float64()).to_numpy(zero_copy_only=False)
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return ColumnSummary(column, str(table.schema.field(column).type), 0, len(values))
    return ColumnSummary(
        name=column,
        type=str(table.schema.field(column).type),
        count=int(valid.size),
        nulls=int(values.size - valid.size),
        mean=float(valid.mean()),
        std=float(valid.std()),
        min=float(valid.min()),
        max=float(valid.max()),
    )


class TableData:
    """`DataAccess` over one in-memory Arrow table: statistics computed like the shard
    service's, features standardised on open (as the data plane's SCALING_STANDARD does),
    the target passed through, rows split into `shards` contiguous shards."""

    def __init__(self, name: str, table: pa.Table, shards: int = 8):
        self.name = name
        self.table = table
        self.shards = max(1, min(shards, max(table.num_rows, 1)))
        numeric = [f.name for f in table.schema if is_numeric(f.type)]
        self.columns = tuple(summarise(table, c) for c in numeric)

    def _bounds(self) -> list[tuple[int, int]]:
        edges = np.linspace(0, self.table.num_rows, self.shards + 1).astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def describe(self, dataset: str, version: int) -> DatasetDescription:
        if dataset != self.name or version not in (0, 1):
            raise NotFound(f"no dataset {dataset!r}")
        return DatasetDescription(
            name=self.name,
            version=1,
            rows=self.table.num_rows,
            shard_rows={i: b - a for i, (a, b) in enumerate(self._bounds())},
            columns=self.columns,
        )

    @contextlib.contextmanager
    def open(
        self, dataset: DatasetDescription, columns: Sequence[str], target: str
    ) -> Iterator[list[ShardSource]]:
        stats = {c.name: c for c in self.columns}
        prepared = {}
        for name in columns:
            column = pc.cast(self.table.column(name), pa.float32())
            if name != target:
                std = stats[name].std or 1.0
                column = pc.divide(pc.subtract(column, stats[name].mean), std)
                column = pc.cast(column, pa.float32())
            prepared[name] = column
        table = pa.table(prepared)
        yield [
            ShardSource.from_table(i, table.slice(a, b - a))
            for i, (a, b) in enumerate(self._bounds())
        ]
