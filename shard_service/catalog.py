"""The shard service's core: datasets as immutable numbered versions of shards.

Layout under the service directory (nothing is ever written outside it):

    datasets/{name}/v{version}/shard-{k:05d}.arrows  Arrow IPC stream, uncompressed
    datasets/{name}/v{version}/dataset.json          rows, shards, column statistics, schema
    datasets/{name}/.tmp-{uuid}/                     an ingest in progress (never read)

Shards are stored as the Arrow data a read serves, so a read memory-maps the file and
decodes nothing: the batches point into the page cache, and a read costs only the
preprocessing it asks for. (Parquet, even with LZ4, spent two thirds of a cold read on
decoding; the ingest formats are unchanged. Versions written as Parquet, manifest format
1, are still read.) The stream format, not the file format, because each batch of a
categorical column may carry its own dictionary.

An ingest streams record batches into one writer per shard inside a temporary directory,
computing column statistics on the way; only a complete ingest is published, by renaming
the directory to the next version number under a per-dataset lock. Reads never take the
lock: a published version never changes.

String columns are stored dictionary-encoded (categorical), their categories in the
statistics. A string target with two classes is served as 0/1 (int8): the classes are known
only at the end of the one pass, so the mapping is recorded in the manifest and applied by
every read.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from onehop.dataset import first_line
from onehop.errors import InvalidArgument, NotFound, ResourceExhausted
from onehop.keys import validate_name
from shard_service.columns import (
    CATEGORICAL,
    ColumnStats,
    StatsAccumulator,
    binary_stats,
    encode_categorical,
    is_numeric,
    is_text,
)
from shard_service.partition import Partitioner
from shard_service.prepare import Prep, output_columns, prepare, prepared_schema

log = logging.getLogger(__name__)

MAX_SHARDS = 4096
MANIFEST = "dataset.json"
# Manifest format: 1 = Parquet shards (read only), 2 = Arrow IPC stream shards.
_FORMAT = 2
_STORAGE = {1: "parquet", 2: "arrows"}
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")
# A shard's buffered rows are written as one record batch once they reach either bound, so
# tiny incoming batches still make batches worth sending, and memory stays bounded per shard
# (8 MiB of buffer per shard during an ingest). Reads cut them to the wire's batch size.
_FLUSH_ROWS = 128 * 1024
_FLUSH_BYTES = 8 << 20
# Shard files kept open (memory-mapped, parsed) between reads, least recently read dropped.
_MAPPED_SHARDS = 256


@dataclass(frozen=True)
class ShardInfo:
    shard: int
    rows: int
    bytes: int


@dataclass(frozen=True)
class DatasetInfo:
    """One published version of a dataset; `versions` lists every version, oldest first."""

    name: str
    version: int
    rows: int
    shards: tuple[ShardInfo, ...]
    columns: tuple[ColumnStats, ...]
    created_unix: float
    schema: pa.Schema
    versions: tuple[int, ...] = ()
    key: str = ""
    partitioning: str = "round-robin"
    # A two-class string target served as 0/1: classes[1] is 1.
    target: str = ""
    classes: tuple[str, ...] = ()
    # How the shards are stored: "arrows" (Arrow IPC stream) or "parquet" (older versions).
    storage: str = "arrows"

    @property
    def logical_schema(self) -> pa.Schema:
        """The schema reads see: as stored, with a two-class target as int8."""
        if not self.classes:
            return self.schema
        index = self.schema.get_field_index(self.target)
        return self.schema.set(index, pa.field(self.target, pa.int8()))

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def column(self, name: str) -> ColumnStats:
        for stats in self.columns:
            if stats.name == name:
                return stats
        raise NotFound(f"dataset {self.name!r} v{self.version} has no column {name!r}")


class Catalog:
    """Datasets on the local filesystem: ingest, describe, list, read prepared shards."""

    def __init__(self, root: Path, default_shards: int = 8):
        self.root = Path(root).resolve() / "datasets"
        self.default_shards = default_shards
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._manifests: dict[tuple[str, int], DatasetInfo] = {}
        self._mapped: OrderedDict[Path, pa.Table] = OrderedDict()
        self._mapped_lock = threading.Lock()

    @classmethod
    def open(cls, root: Path, default_shards: int = 8) -> Catalog:
        """Create the layout and remove ingests that a previous process left unfinished."""
        catalog = cls(root, default_shards)
        catalog.root.mkdir(parents=True, exist_ok=True)
        for stale in catalog.root.glob("*/.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return catalog

    # --- reading -------------------------------------------------------------------------

    def _dataset_dir(self, name: str) -> Path:
        validate_name("dataset", name)
        path = self.root / name
        # validate_name already forbids separators and '..'; this is the belt to its braces.
        if path.parent != self.root:
            raise InvalidArgument(f"invalid dataset name {name!r}")
        return path

    def versions(self, name: str) -> builtins.list[int]:
        try:
            entries = os.listdir(self._dataset_dir(name))
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for e in entries if (m := _VERSION_DIR.fullmatch(e)))

    def describe(self, name: str, version: int = 0) -> DatasetInfo:
        """The given version (0 = newest) of a dataset; NotFound when it does not exist."""
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"no dataset {name!r}")
        version = version or versions[-1]
        if version not in versions:
            raise NotFound(
                f"dataset {name!r} has no version {version}; versions: "
                + ", ".join(map(str, versions))
            )
        info = self._manifests.get((name, version))
        if info is None:
            info = _read_manifest(self._dataset_dir(name) / f"v{version}" / MANIFEST)
            self._manifests[(name, version)] = info
        return _replace_versions(info, versions)

    def list(self) -> builtins.list[DatasetInfo]:
        """The newest version of every dataset, by name."""
        infos = []
        for entry in sorted(os.listdir(self.root)):
            if entry.startswith("."):
                continue
            try:
                infos.append(self.describe(entry))
            except (NotFound, InvalidArgument):
                continue  # a dataset whose first ingest is still running, or a stray entry
        return infos

    def shard_path(self, info: DatasetInfo, shard: int) -> Path:
        if not 0 <= shard < len(info.shards):
            raise NotFound(
                f"dataset {info.name!r} v{info.version} has no shard {shard} "
                f"(it has {len(info.shards)})"
            )
        return self._dataset_dir(info.name) / f"v{info.version}" / _shard_file(shard, info.storage)

    def prepared_schema(self, info: DatasetInfo, prep: Prep) -> pa.Schema:
        """The schema of a shard after filter, projection and preprocessing (no data read)."""
        return prepared_schema(info, prep)

    def read_prepared(self, name: str, version: int, shard: int, prep: Prep) -> pa.Table:
        """One shard, filtered, projected and preprocessed, in stored order."""
        return self.read_shard(self.describe(name, version), shard, prep)

    def read_shard(self, info: DatasetInfo, shard: int, prep: Prep) -> pa.Table:
        """`read_prepared` of a version already described."""
        wanted = output_columns(info, prep)
        needed = wanted + [c for c in prep.filter_columns if c not in wanted]
        path = self.shard_path(info, shard)
        if info.storage == "parquet":
            # The service's threads already read shards in parallel: one thread per read.
            table = pq.ParquetFile(path, memory_map=True).read(columns=needed, use_threads=False)
        else:
            table = self._mapped_shard(path).select(needed)
        table = table.replace_schema_metadata(None)
        if info.classes and info.target in needed:
            index = table.schema.get_field_index(info.target)
            labels = pc.index_in(
                pc.cast(table.column(index), pa.string()), value_set=pa.array(info.classes)
            )
            table = table.set_column(index, info.target, pc.cast(labels, pa.int8()))
        return prepare(table, info, prep)

    def _mapped_shard(self, path: Path) -> pa.Table:
        """A shard file as a table of views into its memory map (zero-copy, nothing
        decoded), kept for the next read: a published shard never changes, and pages
        that stay mapped are not faulted in again by every read."""
        with self._mapped_lock:
            table = self._mapped.get(path)
            if table is not None:
                self._mapped.move_to_end(path)
                return table
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        with self._mapped_lock:
            self._mapped[path] = table
            while len(self._mapped) > _MAPPED_SHARDS:
                self._mapped.popitem(last=False)  # unmapped once no read still uses it
        return table

    # --- ingest ----------------------------------------------------------------------------

    def ingest(
        self,
        name: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        shards: int = 0,
        key: str = "",
        partitioning: str = "",
        bounds: tuple[float, ...] = (),
        target: str = "",
        positive_class: str = "",
    ) -> DatasetInfo:
        """Stream `batches` into a new version of `name`; publish it only if all went well.

        `partitioning` is "round-robin", "hash" or "range" of `key` ("" = hash with a key,
        else round-robin); range `bounds` (ascending) make len(bounds) + 1 shards. A string
        `target` with two classes is served as 0/1, `positive_class` (default: the second
        in sorted order) as 1.

        Raises InvalidArgument (and publishes nothing) on a bad name, shard count, key,
        bounds or target, a batch whose schema differs from `schema`, malformed input or no
        rows at all.
        """
        directory = self._dataset_dir(name)
        schema = _check_schema(schema.remove_metadata())
        partitioning = partitioning or ("hash" if key else "round-robin")
        key_index = _check_partitioning(schema, partitioning, key, bounds)
        if partitioning == "range" and bounds:
            if shards and shards != len(bounds) + 1:
                raise InvalidArgument(
                    f"{len(bounds)} range bounds make {len(bounds) + 1} shards, not {shards}"
                )
            shards = len(bounds) + 1
        shards = shards or self.default_shards
        if not 1 <= shards <= MAX_SHARDS:
            raise InvalidArgument(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
        if target and target not in schema.names:
            raise InvalidArgument(
                f"target column {target!r} is not in the input; columns: {', '.join(schema.names)}"
            )
        stored = pa.schema(
            [pa.field(f.name, CATEGORICAL, f.nullable) if is_text(f.type) else f for f in schema]
        )

        tmp = directory / f".tmp-{uuid.uuid4().hex}"
        try:
            with self._publish_lock(name):
                tmp.mkdir(parents=True)
            partitioner = Partitioner(shards, key_index, partitioning == "range", bounds)
            rows, accumulator, shard_rows = self._write_shards(
                tmp, schema, stored, batches, partitioner
            )
            stats = accumulator.result()
            classes: tuple[str, ...] = ()
            if target and stored.field(target).type == CATEGORICAL:
                counts = accumulator.category_counts(target)
                if counts is not None and len(counts) == 2:
                    classes = _classes(target, sorted(counts), positive_class)
                    stats = [
                        binary_stats(target, s.nulls, counts, list(classes))
                        if s.name == target
                        else s
                        for s in stats
                    ]
            if positive_class and not classes:
                raise InvalidArgument(
                    f"positive_class applies to a string target with two classes; "
                    f"{target or 'no target'!r} is not one"
                )
            shard_infos = tuple(
                ShardInfo(k, shard_rows[k], (tmp / _shard_file(k)).stat().st_size)
                for k in range(shards)
            )
            with self._publish_lock(name):
                versions = self.versions(name)
                version = (versions[-1] if versions else 0) + 1
                info = DatasetInfo(
                    name=name,
                    version=version,
                    rows=rows,
                    shards=shard_infos,
                    columns=tuple(stats),
                    created_unix=time.time(),
                    schema=stored,
                    key=key,
                    partitioning=partitioning if not key else f"{partitioning}:{key}",
                    target=target,
                    classes=classes,
                )
                _write_manifest(tmp / MANIFEST, info)
                os.rename(tmp, directory / f"v{version}")
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError), self._publish_lock(name):
                _remove_if_empty(directory)
            if _disk_full(exc):
                raise ResourceExhausted(
                    f"no space left on the shard service's disk while ingesting {name!r}; "
                    "nothing was published"
                ) from exc
            raise
        log.info("ingested %s v%d: %d rows in %d shards", name, version, rows, shards)
        return _replace_versions(info, [*versions, version])

    def _write_shards(
        self,
        tmp: Path,
        schema: pa.Schema,
        stored: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        partitioner: Partitioner,
    ) -> tuple[int, StatsAccumulator, builtins.list[int]]:
        stats = StatsAccumulator(stored)
        shards = partitioner.shards
        text = [i for i, f in enumerate(schema) if is_text(f.type)]
        sinks = [pa.OSFile(str(tmp / _shard_file(k)), "wb") for k in range(shards)]
        writers = [pa.ipc.new_stream(sink, stored) for sink in sinks]
        buffers: builtins.list[builtins.list[pa.RecordBatch]] = [[] for _ in range(shards)]
        buffered = [0] * shards
        buffered_bytes = [0] * shards
        shard_rows = [0] * shards
        rows = 0

        def flush(k: int) -> None:
            if buffers[k]:
                # One batch (dictionaries unified): contiguous columns to serve from.
                table = pa.Table.from_batches(buffers[k], schema=stored).combine_chunks()
                writers[k].write_table(table)
                buffers[k].clear()
                buffered[k] = buffered_bytes[k] = 0

        try:
            for number, batch in enumerate(_checked_batches(batches, schema), start=1):
                try:
                    for i in text:
                        batch = batch.set_column(
                            i, stored.field(i), encode_categorical(batch.column(i))
                        )
                    stats.update(batch)
                    for k, piece in partitioner.split(batch):
                        buffers[k].append(piece)
                        buffered[k] += piece.num_rows
                        buffered_bytes[k] += piece.nbytes
                        shard_rows[k] += piece.num_rows
                        if buffered[k] >= _FLUSH_ROWS or buffered_bytes[k] >= _FLUSH_BYTES:
                            flush(k)
                except pa.ArrowException as exc:
                    raise InvalidArgument(f"batch {number}: {first_line(exc)}") from exc
                rows += batch.num_rows
            if rows == 0:
                raise InvalidArgument("the input has no rows: nothing to ingest")
            for k in range(shards):
                flush(k)
        finally:
            for writer, sink in zip(writers, sinks, strict=True):
                writer.close()
                sink.close()
        return rows, stats, shard_rows

    @contextmanager
    def _publish_lock(self, name: str) -> Iterator[None]:
        """Serialises version numbering and the dataset directory's creation and removal: a
        thread lock, and a file lock (outside the dataset's directory) for other processes."""
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        with lock, open(locks / f"{name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# --- helpers ----------------------------------------------------------------------------------


def _shard_file(shard: int, storage: str = _STORAGE[_FORMAT]) -> str:
    return f"shard-{shard:05d}.{storage}"


def _check_partitioning(
    schema: pa.Schema, partitioning: str, key: str, bounds: tuple[float, ...]
) -> int | None:
    """The key column's index (None for round-robin), after checking the options."""
    if partitioning not in ("round-robin", "hash", "range"):
        raise InvalidArgument(
            f"unknown partitioning {partitioning!r}: use round-robin, hash or range"
        )
    if partitioning == "round-robin":
        if key or bounds:
            raise InvalidArgument("round-robin partitioning takes no key column and no bounds")
        return None
    if not key:
        raise InvalidArgument(f"{partitioning} partitioning needs a key column")
    if key not in schema.names:
        raise InvalidArgument(
            f"key column {key!r} is not in the input; columns: {', '.join(schema.names)}"
        )
    if partitioning == "range":
        if not is_numeric(schema.field(key).type):
            raise InvalidArgument(
                f"range partitioning needs a numeric key; {key!r} is {schema.field(key).type}"
            )
        if any(math.isnan(b) for b in bounds) or any(
            b >= a for b, a in zip(bounds, bounds[1:], strict=False)
        ):
            raise InvalidArgument("range bounds must be strictly ascending numbers")
    elif bounds:
        raise InvalidArgument("bounds apply to range partitioning only")
    return schema.get_field_index(key)


def _classes(target: str, classes: list[str], positive: str) -> tuple[str, ...]:
    """The two classes ordered so that the positive one (stored as 1) is last."""
    if not positive:
        return tuple(classes)
    if positive not in classes:
        raise InvalidArgument(
            f"positive_class {positive!r} is not a value of {target!r}; its classes: "
            + ", ".join(classes)
        )
    return tuple(sorted(classes, key=lambda c: c == positive))


def _check_schema(schema: pa.Schema) -> pa.Schema:
    if len(schema) == 0:
        raise InvalidArgument("the input has no columns")
    seen: set[str] = set()
    for name in schema.names:
        if not name:
            raise InvalidArgument("every column needs a name; the input has an empty one")
        if name in seen:
            raise InvalidArgument(f"column {name!r} appears twice in the input")
        seen.add(name)
    return schema


def _checked_batches(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    """The input's batches, each checked against the ingest's schema; tables are split."""
    iterator = iter(batches)
    number = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except pa.ArrowException as exc:
            raise InvalidArgument(
                f"malformed input after batch {number}: {first_line(exc)}"
            ) from exc
        number += 1
        if isinstance(item, pa.Table):
            pieces = item.to_batches()
        elif isinstance(item, pa.RecordBatch):
            pieces = [item]
        else:
            raise InvalidArgument(
                f"batch {number} is a {type(item).__name__}, not an Arrow record batch"
            )
        for piece in pieces:
            if not piece.schema.equals(schema, check_metadata=False):
                raise InvalidArgument(f"batch {number}: {_schema_difference(schema, piece.schema)}")
            yield piece


def _schema_difference(expected: pa.Schema, actual: pa.Schema) -> str:
    if expected.names != actual.names:
        return (
            f"columns {actual.names} differ from the first batch's {expected.names}"
            if len(actual.names) < 12
            else "its columns differ from the first batch's"
        )
    for want, got in zip(expected, actual, strict=True):
        if want.type != got.type:
            return f"column {want.name!r} is {got.type}, expected {want.type} as in the first batch"
    return "its schema differs from the first batch's (nullability)"


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC or a quota, from Python's file calls or Arrow's writers (whose OSError may
    carry only the message)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(exc) for text in ("No space left on device", "Disk quota exceeded")
    )


def _remove_if_empty(directory: Path) -> None:
    """After a failed first ingest, leave no trace of the dataset."""
    try:
        directory.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _replace_versions(info: DatasetInfo, versions: list[int]) -> DatasetInfo:
    return dataclasses.replace(info, versions=tuple(versions))


def _write_manifest(path: Path, info: DatasetInfo) -> None:
    document = {
        "format": _FORMAT,
        "name": info.name,
        "version": info.version,
        "rows": info.rows,
        "created_unix": info.created_unix,
        "key": info.key,
        "partitioning": info.partitioning,
        "target": info.target,
        "classes": list(info.classes),
        "shards": [vars(s) for s in info.shards],
        "columns": [vars(c) for c in info.columns],
        "schema": base64.b64encode(info.schema.serialize().to_pybytes()).decode(),
    }
    path.write_text(json.dumps(document, indent=1))


def _read_manifest(path: Path) -> DatasetInfo:
    document = json.loads(path.read_text())
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(document["schema"])))
    return DatasetInfo(
        name=document["name"],
        version=document["version"],
        rows=document["rows"],
        shards=tuple(ShardInfo(**s) for s in document["shards"]),
        columns=tuple(_column_stats(c) for c in document["columns"]),
        created_unix=document["created_unix"],
        schema=schema,
        key=document.get("key", ""),
        partitioning=document.get("partitioning", "round-robin"),
        target=document.get("target", ""),
        classes=tuple(document.get("classes", ())),
        storage=_STORAGE[document.get("format", 1)],
    )


def _column_stats(document: dict) -> ColumnStats:
    categories = document.pop("categories", None)
    return ColumnStats(**document, categories=tuple(categories) if categories is not None else None)
