"""How ingested rows are assigned to shards: dealt round-robin in slices, by a stable hash
of a key column (so every row of one key lands in one shard, in any process, on any run), or
by ranges of a numeric column."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onehop.errors import InvalidArgument

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
# Multiplier of the polynomial byte hash for string keys (an odd 64-bit constant).
_POLY = np.uint64(0x100000001B3)


class Partitioner:
    """Splits each batch into (shard, slice) pieces.

    Without a key, each batch is cut into min(shards, rows) near-equal contiguous slices dealt
    to the shards after the last one used: a stream of many small batches is round-robin by
    batch, and one large batch still fills every shard. With a key, a row goes to
    `hash(key) % shards`; with a key and `ranges`, to the shard whose range holds the key's
    value (shard k: bounds[k-1] <= x < bounds[k]; missing values go to shard 0). Ranges
    without bounds take the quantiles of the first batch, so a stream is placed in one pass.
    """

    def __init__(
        self,
        shards: int,
        key_index: int | None = None,
        ranges: bool = False,
        bounds: tuple[float, ...] = (),
    ):
        self.shards = shards
        self._key_index = key_index
        self._ranges = ranges
        self.bounds = bounds
        self._cursor = 0

    def split(self, batch: pa.RecordBatch) -> Iterator[tuple[int, pa.RecordBatch]]:
        rows = batch.num_rows
        if rows == 0:
            return
        if self._key_index is None:
            parts = min(self.shards, rows)
            base, extra = divmod(rows, parts)
            start = 0
            for i in range(parts):
                length = base + (1 if i < extra else 0)
                yield (self._cursor + i) % self.shards, batch.slice(start, length)
                start += length
            self._cursor = (self._cursor + parts) % self.shards
            return
        if self._ranges:
            ids = self._range_ids(batch.column(self._key_index))
        else:
            hashed = key_hash(batch.column(self._key_index))
            ids = (hashed % np.uint64(self.shards)).astype(np.int64)
        order = np.argsort(ids, kind="stable")
        counts = np.bincount(ids, minlength=self.shards)
        grouped = batch.take(pa.array(order))
        start = 0
        for shard, length in enumerate(counts.tolist()):
            if length:
                yield shard, grouped.slice(start, length)
            start += length

    def _range_ids(self, column: pa.Array) -> np.ndarray:
        values = pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        if not self.bounds:
            present = values[~np.isnan(values)]
            if len(present) == 0:
                present = np.zeros(1)
            cuts = np.quantile(present, np.arange(1, self.shards) / self.shards)
            self.bounds = tuple(float(b) for b in cuts)
        ids = np.searchsorted(np.asarray(self.bounds), values, side="right")
        return np.where(np.isnan(values), 0, ids).astype(np.int64)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole 64-bit word."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z & _MASK


def _bytes_hash(array: pa.Array) -> np.ndarray:
    """A polynomial hash over each value's bytes, vectorised over the whole array."""
    array = pc.cast(array, pa.large_binary())
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
        array.offset : array.offset + len(array) + 1
    ]
    lengths = np.diff(offsets)
    raw = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0)
    data = raw[offsets[0] : offsets[-1]].astype(np.uint64)
    if len(data) == 0:
        return _mix(lengths.astype(np.uint64))
    starts = offsets[:-1] - offsets[0]
    position = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(int(lengths.max()), _POLY, dtype=np.uint64), dtype=np.uint64)
        terms = (data + np.uint64(1)) * powers[position]
        prefix = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(terms, dtype=np.uint64)])
        # Modular prefix differences: exact per value even when the sums wrap around.
        sums = prefix[starts + lengths] - prefix[starts]
    return _mix(sums ^ lengths.astype(np.uint64))


def key_hash(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A stable 64-bit hash per value (nulls hash alike) for integer, float, bool, temporal,
    string and binary key columns."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    type_ = column.type
    if pa.types.is_dictionary(type_):
        column = column.dictionary_decode()
        type_ = column.type
    if (
        pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
    ):
        hashed = _bytes_hash(column)
    elif pa.types.is_floating(type_):
        # +0.0 folds -0.0 into 0.0 so equal keys hash alike.
        values = pc.cast(column, pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        hashed = _mix((values + 0.0).view(np.uint64))
    elif pa.types.is_temporal(type_) and type_.bit_width in (32, 64):
        # Dates and times hash by their stored integer (days, units since the epoch...).
        values = column.view(pa.int32() if type_.bit_width == 32 else pa.int64())
        values = pc.cast(values, pa.int64()).fill_null(0)
        hashed = _mix(values.to_numpy(zero_copy_only=False).view(np.uint64))
    elif pa.types.is_integer(type_) or pa.types.is_boolean(type_) or pa.types.is_decimal(type_):
        values = pc.cast(column, pa.int64(), safe=False).fill_null(0)
        hashed = _mix(values.to_numpy(zero_copy_only=False).view(np.uint64))
    else:
        raise InvalidArgument(
            f"cannot shard by a key column of type {type_}: use an integer, float, "
            "string or binary column"
        )
    if column.null_count:
        hashed = np.where(column.is_null().to_numpy(zero_copy_only=False), np.uint64(0), hashed)
    return hashed
