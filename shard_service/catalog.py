"""The shard service's core: datasets as immutable numbered versions of Parquet shards.

Layout under the service directory (nothing is ever written outside it):

    datasets/{name}/v{version}/shard-{k:05d}.parquet
    datasets/{name}/v{version}/dataset.json      rows, shards, column statistics, schema
    datasets/{name}/.tmp-{uuid}/                 an ingest in progress (never read)

An ingest streams record batches into one ParquetWriter per shard inside a temporary
directory, computing column statistics on the way; only a complete ingest is published, by
renaming the directory to the next version number under a per-dataset lock. Reads never
take the lock: a published version never changes.
"""

from __future__ import annotations

import base64
import builtins
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from onehop.errors import InvalidArgument, NotFound
from onehop.keys import validate_name
from shard_service.columns import ColumnStats, StatsAccumulator, is_numeric, standardize
from shard_service.partition import Partitioner

log = logging.getLogger(__name__)

MAX_SHARDS = 4096
MANIFEST = "dataset.json"
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")
# A shard's buffered rows are written as one row group once they reach either bound, so tiny
# incoming batches still make row groups worth reading, and memory stays bounded per shard.
_FLUSH_ROWS = 64 * 1024
_FLUSH_BYTES = 4 << 20


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

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def column(self, name: str) -> ColumnStats:
        for stats in self.columns:
            if stats.name == name:
                return stats
        raise NotFound(f"dataset {self.name!r} v{self.version} has no column {name!r}")


@dataclass(frozen=True)
class Prep:
    """How a shard is prepared for one read: projection, then standard scaling."""

    columns: tuple[str, ...] = ()
    standardize: bool = False
    passthrough: tuple[str, ...] = field(default=())


class Catalog:
    """Datasets on the local filesystem: ingest, describe, list, read prepared shards."""

    def __init__(self, root: Path, default_shards: int = 8):
        self.root = Path(root).resolve() / "datasets"
        self.default_shards = default_shards
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._manifests: dict[tuple[str, int], DatasetInfo] = {}

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
        return self._dataset_dir(info.name) / f"v{info.version}" / _shard_file(shard)

    def prepared_schema(self, info: DatasetInfo, prep: Prep) -> pa.Schema:
        """The schema of a shard after projection and scaling (no data is read)."""
        schema = info.schema
        columns = _check_columns(info, prep)
        fields = [schema.field(name) for name in columns]
        if prep.standardize:
            keep = set(prep.passthrough)
            fields = [
                pa.field(f.name, pa.float32(), nullable=f.nullable)
                if is_numeric(f.type) and f.name not in keep
                else f
                for f in fields
            ]
        return pa.schema(fields)

    def read_prepared(self, name: str, version: int, shard: int, prep: Prep) -> pa.Table:
        """One shard, projected and scaled, in stored order."""
        info = self.describe(name, version)
        schema = self.prepared_schema(info, prep)
        path = self.shard_path(info, shard)
        table = pq.read_table(path, columns=list(schema.names), use_threads=False)
        table = table.replace_schema_metadata(None)
        if prep.standardize:
            keep = set(prep.passthrough)
            for index, out_field in enumerate(schema):
                if not is_numeric(table.schema.field(index).type) or out_field.name in keep:
                    continue
                stats = info.column(out_field.name)
                scaled = standardize(table.column(index), stats.mean or 0.0, stats.std or 0.0)
                table = table.set_column(index, out_field, scaled)
        return table

    # --- ingest ----------------------------------------------------------------------------

    def ingest(
        self,
        name: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        shards: int = 0,
        key: str = "",
    ) -> DatasetInfo:
        """Stream `batches` into a new version of `name`; publish it only if all went well.

        Raises InvalidArgument (and publishes nothing) on a bad name, shard count or key, a
        batch whose schema differs from `schema`, malformed input or no rows at all.
        """
        directory = self._dataset_dir(name)
        shards = shards or self.default_shards
        if not 1 <= shards <= MAX_SHARDS:
            raise InvalidArgument(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
        schema = _check_schema(schema.remove_metadata())
        key_index = None
        if key:
            if key not in schema.names:
                raise InvalidArgument(
                    f"key column {key!r} is not in the input; columns: {', '.join(schema.names)}"
                )
            key_index = schema.get_field_index(key)

        tmp = directory / f".tmp-{uuid.uuid4().hex}"
        with self._publish_lock(name):
            tmp.mkdir(parents=True)
        try:
            rows, stats, shard_rows = self._write_shards(tmp, schema, batches, shards, key_index)
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
                    schema=schema,
                    key=key,
                )
                _write_manifest(tmp / MANIFEST, info)
                os.rename(tmp, directory / f"v{version}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._publish_lock(name):
                _remove_if_empty(directory)
            raise
        log.info("ingested %s v%d: %d rows in %d shards", name, version, rows, shards)
        return _replace_versions(info, [*versions, version])

    def _write_shards(
        self,
        tmp: Path,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        shards: int,
        key_index: int | None,
    ) -> tuple[int, builtins.list[ColumnStats], builtins.list[int]]:
        stats = StatsAccumulator(schema)
        partitioner = Partitioner(shards, key_index)
        writers = [pq.ParquetWriter(tmp / _shard_file(k), schema) for k in range(shards)]
        buffers: builtins.list[builtins.list[pa.RecordBatch]] = [[] for _ in range(shards)]
        buffered = [0] * shards
        buffered_bytes = [0] * shards
        shard_rows = [0] * shards
        rows = 0

        def flush(k: int) -> None:
            if buffers[k]:
                writers[k].write_table(pa.Table.from_batches(buffers[k], schema=schema))
                buffers[k].clear()
                buffered[k] = buffered_bytes[k] = 0

        try:
            for number, batch in enumerate(_checked_batches(batches, schema), start=1):
                try:
                    stats.update(batch)
                    for k, piece in partitioner.split(batch):
                        buffers[k].append(piece)
                        buffered[k] += piece.num_rows
                        buffered_bytes[k] += piece.nbytes
                        shard_rows[k] += piece.num_rows
                        if buffered[k] >= _FLUSH_ROWS or buffered_bytes[k] >= _FLUSH_BYTES:
                            flush(k)
                except pa.ArrowException as exc:
                    raise InvalidArgument(f"batch {number}: {_first_line(exc)}") from exc
                rows += batch.num_rows
            if rows == 0:
                raise InvalidArgument("the input has no rows: nothing to ingest")
            for k in range(shards):
                flush(k)
        finally:
            for writer in writers:
                writer.close()
        return rows, stats.result(), shard_rows

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


def _shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


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
                f"malformed input after batch {number}: {_first_line(exc)}"
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


def _check_columns(info: DatasetInfo, prep: Prep) -> list[str]:
    names = info.schema.names
    known = set(names)
    for column in (*prep.columns, *prep.passthrough):
        if column not in known:
            raise InvalidArgument(
                f"dataset {info.name!r} v{info.version} has no column {column!r}; "
                f"columns: {', '.join(names)}"
            )
    if len(set(prep.columns)) != len(prep.columns):
        raise InvalidArgument("a column is named twice in the projection")
    return list(prep.columns) or names


def _remove_if_empty(directory: Path) -> None:
    """After a failed first ingest, leave no trace of the dataset."""
    try:
        directory.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _replace_versions(info: DatasetInfo, versions: list[int]) -> DatasetInfo:
    return DatasetInfo(
        name=info.name,
        version=info.version,
        rows=info.rows,
        shards=info.shards,
        columns=info.columns,
        created_unix=info.created_unix,
        schema=info.schema,
        versions=tuple(versions),
        key=info.key,
    )


def _write_manifest(path: Path, info: DatasetInfo) -> None:
    document = {
        "format": 1,
        "name": info.name,
        "version": info.version,
        "rows": info.rows,
        "created_unix": info.created_unix,
        "key": info.key,
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
        columns=tuple(ColumnStats(**c) for c in document["columns"]),
        created_unix=document["created_unix"],
        schema=schema,
        key=document.get("key", ""),
    )
