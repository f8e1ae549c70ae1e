"""The LMDB cache core (no gRPC): one environment, one writer thread with group commit,
checksummed values with optional TTL, a byte budget with segmented-LRU eviction, and
per-namespace stats. `CacheReader` opens the same environment read-only from another
process on this host, for zero-hop hits (DESIGN §3).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from onehop.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    OnehopError,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 511  # LMDB's compiled-in key limit (env.max_key_size()).
# The map is virtual address space, not disk: room for B-tree pages, overflow-page rounding
# and the copy-on-write pages a commit needs, on top of the budget.
MAP_HEADROOM_BYTES = 64 << 20
# Group commit: one write transaction takes at most this much work.
MAX_BATCH_OPS = 1024
MAX_BATCH_BYTES = 64 << 20
# Share of the budget that entries hit at least twice may hold (the rest is probation).
PROTECTED_SHARE = 0.8
MAINTENANCE_SECONDS = 30.0
MAP_FULL_RETRIES = 8
DEFAULT_NAMESPACE = "default"

Clock = Callable[[], float]


# --- value format (shared by the store and the reader so they cannot drift) ---------------
#
# header = crc32 (uint32) | expiry unix seconds (uint64, 0 = never), little-endian; the crc
# covers the expiry field and the payload, so a flipped bit in either reads as corrupt.

HEADER = struct.Struct("<IQ")
_EXPIRY = struct.Struct("<Q")
OK, CORRUPT, EXPIRED = "ok", "corrupt", "expired"


def pack_value(payload: Any, expiry: int) -> bytes:
    """Header + payload, ready for LMDB. `payload` is any bytes-like object."""
    expiry_bytes = _EXPIRY.pack(expiry)
    crc = zlib.crc32(payload, zlib.crc32(expiry_bytes))
    return b"".join((HEADER.pack(crc, expiry), payload))


def unpack_value(raw: Any, now: float) -> tuple[str, memoryview | None]:
    """(OK, payload view) or (EXPIRED | CORRUPT, None) for a stored value."""
    view = memoryview(raw)
    if len(view) < HEADER.size:
        return CORRUPT, None
    crc, expiry = HEADER.unpack_from(view)
    payload = view[HEADER.size :]
    if zlib.crc32(payload, zlib.crc32(view[4 : HEADER.size])) != crc:
        return CORRUPT, None
    if expiry and now >= expiry:
        return EXPIRED, None
    return OK, payload


def peek_expiry(raw: Any) -> int:
    """The expiry field alone (no checksum): what the index needs at open."""
    view = memoryview(raw)
    return HEADER.unpack_from(view)[1] if len(view) >= HEADER.size else 0


def namespace_of(key: bytes) -> str:
    """The key up to its first '/' ("pred", "shard", ...)."""
    head, sep, _ = key.partition(b"/")
    return head.decode("utf-8", "replace") if sep and head else DEFAULT_NAMESPACE


def check_key(key: Any) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise InvalidArgument(f"cache keys are bytes, got {type(key).__name__}")
    key = bytes(key)
    if not key or len(key) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"cache key must be 1-{MAX_KEY_BYTES} bytes, got {len(key)} bytes"
            + (f" ({_show(key)}...)" if key else "")
        )
    return key


def _show(key: bytes) -> str:
    return key[:64].decode("utf-8", "backslashreplace")


# --- one environment per process ---------------------------------------------------------
#
# LMDB forbids opening one environment twice in a process (py-lmdb refuses), so a reader in
# the process that runs the store (the in-process mesh, tests) borrows the store's handle.


@dataclass
class _SharedEnv:
    env: lmdb.Environment
    writable: bool
    store_attached: bool
    refs: int = 1


_ENVS: dict[str, _SharedEnv] = {}
_ENVS_LOCK = threading.Lock()


def _open_env(path: Path, **options: Any) -> lmdb.Environment:
    try:
        return lmdb.open(str(path), subdir=True, **options)
    except lmdb.InvalidError as exc:
        raise FailedPrecondition(
            f"{path / 'data.mdb'} is not a valid LMDB file ({exc}); refusing to serve or "
            "overwrite it: move it away or point ONEHOP_DATA_DIR elsewhere"
        ) from exc
    except lmdb.VersionMismatchError as exc:
        raise FailedPrecondition(
            f"{path} was written by an incompatible LMDB version ({exc})"
        ) from exc


def _acquire_store_env(path: Path, options: dict[str, Any]) -> lmdb.Environment:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        shared = _ENVS.get(key)
        if shared is not None:
            if shared.store_attached or not shared.writable:
                raise FailedPrecondition(
                    f"the cache environment {path} is already open in this process "
                    f"({'by a CacheStore' if shared.store_attached else 'read-only'}); "
                    "open the CacheStore first and one per environment"
                )
            shared.store_attached = True
            shared.refs += 1
            return shared.env
        env = _open_env(path, **options)
        _ENVS[key] = _SharedEnv(env, writable=True, store_attached=True)
        return env


def _acquire_reader_env(path: Path) -> tuple[lmdb.Environment, bool]:
    """(env, borrowed): the store's handle when it is open in this process."""
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        shared = _ENVS.get(key)
        if shared is not None:
            shared.refs += 1
            return shared.env, shared.writable
        if not (path / "data.mdb").exists():
            raise Unavailable(f"no cache environment at {path}: is the cache service running?")
        # map_size=0 adopts the size the writer recorded, so growth up to it never needs a
        # remap here; lock=True registers our read slots where the writer can see them.
        env = _open_env(path, readonly=True, lock=True, map_size=0, max_spare_txns=4)
        _ENVS[key] = _SharedEnv(env, writable=False, store_attached=False)
        return env, False


def _release_env(path: Path, *, store: bool) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        shared = _ENVS.get(key)
        if shared is None:
            return
        if store:
            shared.store_attached = False
        shared.refs -= 1
        if shared.refs == 0:
            del _ENVS[key]
            shared.env.close()


# --- stats -------------------------------------------------------------------------------


@dataclass
class NamespaceStats:
    """Counters of one namespace; the store keeps live ones and hands out copies."""

    hits: int = 0
    misses: int = 0
    entries: int = 0
    bytes: int = 0
    evictions: int = 0
    # Reads that found a value failing its checksum / past its TTL (both also misses).
    corrupt: int = 0
    expired: int = 0


@dataclass(frozen=True)
class StoreStats:
    namespaces: dict[str, NamespaceStats]
    capacity_bytes: int
    used_bytes: int
    # Write transactions committed; puts per commit shows how well group commit batches.
    commits: int = 0


@dataclass(slots=True)
class _Entry:
    size: int
    expiry: int
    namespace: str


class _Recency:
    """Segmented LRU: new keys enter probation, a hit promotes them to the protected
    segment, victims come from probation first. A one-pass sweep (an epoch of shards, a
    burst of one-off predictions) therefore cannot flush the keys that are read again."""

    def __init__(self, protected_capacity: int):
        self.protected_capacity = protected_capacity
        self.probation: OrderedDict[bytes, int] = OrderedDict()
        self.protected: OrderedDict[bytes, int] = OrderedDict()
        self.protected_bytes = 0

    def add(self, key: bytes, size: int) -> None:
        """A write: a protected key stays protected, anything else starts in probation."""
        if key in self.protected:
            self.protected_bytes += size - self.protected[key]
            self.protected[key] = size
            self.protected.move_to_end(key)
            self._rebalance()
        else:
            self.probation[key] = size
            self.probation.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self.protected:
            self.protected.move_to_end(key)
        elif key in self.probation:
            size = self.probation.pop(key)
            self.protected[key] = size
            self.protected_bytes += size
            self._rebalance()

    def remove(self, key: bytes) -> None:
        if key in self.protected:
            self.protected_bytes -= self.protected.pop(key)
        else:
            self.probation.pop(key, None)

    def oldest_first(self) -> Iterator[bytes]:
        yield from self.probation
        yield from self.protected

    def _rebalance(self) -> None:
        while self.protected_bytes > self.protected_capacity and len(self.protected) > 1:
            key, size = self.protected.popitem(last=False)
            self.protected_bytes -= size
            self.probation[key] = size  # demoted to the young end of probation


# --- the writer's work items -------------------------------------------------------------

_PUT, _DELETE, _REMOVE_IF_BAD = "put", "delete", "remove_if_bad"


@dataclass
class _Op:
    kind: str
    # put: [(key, stored value, expiry)]; delete / remove_if_bad: [key]
    items: list[Any]
    nbytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    result: int = 0
    error: BaseException | None = None


_STOP = object()


class CacheStore:
    """The cache's one LMDB environment and its one writer.

    Reads run on the caller's thread in read-only transactions; every write (puts, deletes,
    evictions, removal of corrupt or expired values) goes through the writer thread, which
    commits whatever is queued in one durable transaction. `put*` return once their
    transaction has committed.
    """

    def __init__(
        self,
        path: Path,
        capacity_bytes: int,
        max_readers: int = 126,
        *,
        map_size: int | None = None,
        clock: Clock = time.time,
    ):
        if capacity_bytes <= 0:
            raise InvalidArgument(f"cache capacity must be positive, got {capacity_bytes}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self._env = _acquire_store_env(
            self.path,
            dict(
                map_size=map_size or 2 * capacity_bytes + MAP_HEADROOM_BYTES,
                max_readers=max_readers,
                max_dbs=0,
                # The map stays read-only to us: a stray pointer cannot corrupt the database.
                writemap=False,
                # Durable on commit (kill -9 and power loss): an acknowledged put survives.
                sync=True,
                metasync=True,
                lock=True,
            ),
        )
        # Leave half of the reader table to zero-hop readers in other processes.
        self._read_slots = threading.BoundedSemaphore(max(1, max_readers // 2))
        self._lock = threading.Lock()  # the index, recency and counters
        self._entries: dict[bytes, _Entry] = {}
        self._recency = _Recency(int(capacity_bytes * PROTECTED_SHARE))
        self._counters: dict[str, NamespaceStats] = {}
        self.used_bytes = 0
        self._commits = 0
        try:
            self._env.reader_check()  # slots left by dead processes
            self._load_index()
        except BaseException:
            _release_env(self.path, store=True)
            raise

        self._queue: queue.Queue[Any] = queue.Queue()
        self._state_lock = threading.Lock()
        self._closed = False
        self._writer = threading.Thread(target=self._run_writer, name="cache-writer", daemon=True)
        self._writer.start()
        if self.used_bytes > capacity_bytes:  # reopened with a smaller budget: an empty
            # write makes the writer evict down to it before the first request
            self._submit(_Op(_DELETE, []))

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in key order; None for a miss (absent, expired or corrupt)."""
        keys = [check_key(key) for key in keys]
        self._check_open()
        now = self._clock()
        values: list[bytes | None] = []
        bad: list[tuple[bytes, str]] = []
        with self._read_slots, self._env.begin(buffers=True) as txn:
            for key in keys:
                raw = txn.get(key)
                if raw is None:
                    values.append(None)
                    continue
                state, payload = unpack_value(raw, now)
                if payload is None:
                    bad.append((key, state))
                    values.append(None)
                else:
                    values.append(bytes(payload))  # copied out before the snapshot ends
        with self._lock:
            for key, value in zip(keys, values, strict=True):
                counters = self._ns(namespace_of(key))
                if value is None:
                    counters.misses += 1
                else:
                    counters.hits += 1
                    self._recency.touch(key)
            for key, state in bad:
                counters = self._ns(namespace_of(key))
                if state == CORRUPT:
                    counters.corrupt += 1
                else:
                    counters.expired += 1
        if bad:
            for key, state in bad:
                if state == CORRUPT:
                    log.warning("corrupt cache value for %s: removed", _show(key))
            self._submit(_Op(_REMOVE_IF_BAD, [key for key, _ in bad]), wait=False)
        return values

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key holds a live value (from the index: no LMDB read, no stats)."""
        keys = [check_key(key) for key in keys]
        self._check_open()
        now = self._clock()
        with self._lock:
            found = []
            for key in keys:
                entry = self._entries.get(key)
                found.append(entry is not None and not (entry.expiry and now >= entry.expiry))
            return found

    # --- writes --------------------------------------------------------------------------

    def put(self, key: bytes, value: Any, ttl_seconds: int = 0) -> None:
        self.put_many([(key, value)], ttl_seconds)

    def put_many(self, items: Sequence[tuple[bytes, Any]], ttl_seconds: int = 0) -> int:
        """Store every item (all or none are accepted) and wait until they are durable."""
        if ttl_seconds < 0:
            raise InvalidArgument(f"ttl_seconds must be >= 0, got {ttl_seconds}")
        expiry = math.ceil(self._clock()) + ttl_seconds if ttl_seconds else 0
        packed = []
        total = 0
        for key, value in items:
            key = check_key(key)
            if not isinstance(value, bytes | bytearray | memoryview):
                raise InvalidArgument(f"cache values are bytes, got {type(value).__name__}")
            stored = pack_value(value, expiry)
            size = len(key) + len(stored)
            if size > self.capacity_bytes:
                raise ResourceExhausted(
                    f"value for cache key {_show(key)!r} needs {size} bytes, more than the "
                    f"whole cache budget of {self.capacity_bytes} bytes; raise "
                    "ONEHOP_CACHE_SIZE_BYTES or store smaller values"
                )
            packed.append((key, stored, expiry))
            total += size
        if total > self.capacity_bytes:
            raise ResourceExhausted(
                f"a batch of {total} bytes exceeds the cache budget of {self.capacity_bytes} "
                "bytes; send smaller batches"
            )
        if not packed:
            return 0
        return self._submit(_Op(_PUT, packed, nbytes=total))

    def delete_many(self, keys: Sequence[bytes]) -> int:
        """Remove the keys; returns how many existed."""
        keys = [check_key(key) for key in keys]
        return self._submit(_Op(_DELETE, keys)) if keys else 0

    # --- stats and lifecycle -------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self._lock:
            namespaces = {
                name: dataclasses.replace(counters) for name, counters in self._counters.items()
            }
            return StoreStats(namespaces, self.capacity_bytes, self.used_bytes, self._commits)

    def close(self) -> None:
        """Finish the queued writes, stop the writer, close the environment."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        _release_env(self.path, store=True)

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals: index ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the cache store is closed")

    def _ns(self, namespace: str) -> NamespaceStats:
        counters = self._counters.get(namespace)
        if counters is None:
            counters = self._counters[namespace] = NamespaceStats()
        return counters

    def _load_index(self) -> None:
        """Rebuild the index from disk so a restarted cache serves its old entries."""
        with self._env.begin(buffers=True) as txn, txn.cursor() as cursor:
            for raw_key, raw in cursor:
                key = bytes(raw_key)
                self._set_entry(key, _Entry(len(key) + len(raw), peek_expiry(raw), ""))
        if self._entries:
            log.info("cache opened warm: %d entries, %d bytes", len(self._entries), self.used_bytes)

    def _set_entry(self, key: bytes, entry: _Entry | None, *, evicted: bool = False) -> None:
        """Apply one committed change to the index (caller holds _lock or is the opener)."""
        old = self._entries.pop(key, None)
        if old is not None:
            counters = self._ns(old.namespace)
            counters.entries -= 1
            counters.bytes -= old.size
            counters.evictions += evicted
            self.used_bytes -= old.size
        if entry is None:
            self._recency.remove(key)
            return
        entry.namespace = namespace_of(key)
        counters = self._ns(entry.namespace)
        counters.entries += 1
        counters.bytes += entry.size
        self.used_bytes += entry.size
        self._entries[key] = entry
        self._recency.add(key, entry.size)

    def _victims(self, excess: int, skip: Iterable[bytes] = ()) -> list[bytes]:
        """Least valuable keys whose removal frees at least `excess` bytes (caller locks)."""
        skip = set(skip)
        victims: list[bytes] = []
        for key in self._recency.oldest_first():
            if excess <= 0:
                break
            if key in skip:
                continue
            victims.append(key)
            excess -= self._entries[key].size
        return victims

    # --- internals: the writer -----------------------------------------------------------

    def _submit(self, op: _Op, wait: bool = True) -> int:
        with self._state_lock:
            if self._closed:
                if not wait:
                    return 0
                raise Unavailable("the cache store is closed")
            self._queue.put(op)
        if not wait:
            return 0
        op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    def _run_writer(self) -> None:
        stopping = False
        next_maintenance = time.monotonic() + MAINTENANCE_SECONDS
        while not stopping:
            if time.monotonic() >= next_maintenance:
                self._maintain()
                next_maintenance = time.monotonic() + MAINTENANCE_SECONDS
            try:
                first = self._queue.get(timeout=max(0.0, next_maintenance - time.monotonic()))
            except queue.Empty:
                continue
            if first is _STOP:
                break
            batch = [first]
            nbytes = first.nbytes
            while len(batch) < MAX_BATCH_OPS and nbytes < MAX_BATCH_BYTES:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is _STOP:
                    stopping = True
                    break
                batch.append(op)
                nbytes += op.nbytes
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[_Op]) -> None:
        try:
            results = self._write(batch)
        except lmdb.MapFullError:
            if len(batch) > 1:  # isolate the write that cannot fit from the others
                for op in batch:
                    self._commit_batch([op])
                return
            self._finish(
                batch,
                error=ResourceExhausted(
                    f"the cache is full: no room for {batch[0].nbytes} bytes even after "
                    "eviction; retry later or raise ONEHOP_CACHE_SIZE_BYTES"
                ),
            )
            return
        except OnehopError as exc:
            self._finish(batch, error=exc)
            return
        except Exception as exc:  # keep the writer alive; callers see INTERNAL
            self._finish(batch, error=Internal.wrap(exc))
            return
        for op, result in zip(batch, results, strict=True):
            op.result = result
        self._finish(batch)

    @staticmethod
    def _finish(batch: list[_Op], error: BaseException | None = None) -> None:
        for op in batch:
            op.error = error
            op.done.set()

    def _write(self, batch: list[_Op]) -> list[int]:
        """Commit the batch, making room in the map by evicting when LMDB says it is full."""
        for _ in range(MAP_FULL_RETRIES):
            try:
                return self._write_once(batch)
            except lmdb.MapFullError:
                if not self._evict_for_map(sum(op.nbytes for op in batch)):
                    raise
        raise lmdb.MapFullError("map full after eviction")

    def _write_once(self, batch: list[_Op]) -> list[int]:
        now = self._clock()
        results: list[int] = []
        # Committed state after this batch, as an overlay: key -> new entry or None (gone).
        pending: dict[bytes, _Entry | None] = {}
        with self._env.begin(write=True, buffers=True) as txn:
            for op in batch:
                count = 0
                if op.kind == _PUT:
                    for key, stored, expiry in op.items:
                        txn.put(key, stored)
                        pending[key] = _Entry(len(key) + len(stored), expiry, "")
                        count += 1
                elif op.kind == _DELETE:
                    for key in op.items:
                        count += txn.delete(key)
                        pending[key] = None
                else:  # _REMOVE_IF_BAD: a put may have replaced the bad value since the read
                    for key in op.items:
                        raw = txn.get(key)
                        if raw is not None and unpack_value(raw, now)[0] != OK:
                            count += txn.delete(key)
                            pending[key] = None
                results.append(count)
            with self._lock:
                growth = sum(
                    (entry.size if entry else 0) - self._size_of(key)
                    for key, entry in pending.items()
                )
                victims = self._victims(self.used_bytes + growth - self.capacity_bytes, pending)
            for key in victims:
                txn.delete(key)
        # The `with` committed; only now does the index change.
        with self._lock:
            self._commits += 1
            for key in victims:
                self._set_entry(key, None, evicted=True)
            for key, entry in pending.items():
                self._set_entry(key, entry)
        return results

    def _size_of(self, key: bytes) -> int:
        entry = self._entries.get(key)
        return entry.size if entry else 0

    def _evict_for_map(self, needed: int) -> int:
        """LMDB's map is full (page overhead beyond the budget): evict a slice and commit
        it alone, so its pages are free for the retry. Returns how many keys went."""
        self._env.reader_check()  # a dead reader's snapshot pins pages
        with self._lock:
            victims = self._victims(max(2 * needed, self.used_bytes // 8, 1))
        if not victims:
            return 0
        with self._env.begin(write=True) as txn:
            for key in victims:
                txn.delete(key)
        with self._lock:
            self._commits += 1
            for key in victims:
                self._set_entry(key, None, evicted=True)
        log.info("cache map full: evicted %d entries to make room", len(victims))
        return len(victims)

    def _maintain(self) -> None:
        """Periodic work: clear reader slots of dead processes, drop expired entries."""
        try:
            self._env.reader_check()
            now = self._clock()
            with self._lock:
                expired = [k for k, e in self._entries.items() if e.expiry and now >= e.expiry]
            if expired:
                self._write_once([_Op(_REMOVE_IF_BAD, expired)])
        except Exception:
            log.exception("cache maintenance failed")


class CacheReader:
    """Read-only view of a cache environment on this host: hits straight from the memory
    map, zero hops. Checksums and expiry are verified exactly as the store does; a bad or
    expired value is a miss here and is left for the store (the only writer) to remove."""

    def __init__(self, path: Path, *, clock: Clock = time.time):
        self.path = Path(path)
        self._clock = clock
        self._env, self._borrowed = _acquire_reader_env(self.path)
        self._closed = False
        # Remapping (adopting a larger map the writer set after we opened) needs no
        # transaction open in this process: reads share, the remap is exclusive.
        self._cond = threading.Condition()
        self._active = 0
        self._remapping = False
        self._read_slots = threading.BoundedSemaphore(max(1, self._env.max_readers() // 4))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        keys = [check_key(key) for key in keys]
        for attempt in range(2):
            try:
                with self._reading() as env, env.begin(buffers=True) as txn:
                    now = self._clock()
                    values: list[bytes | None] = []
                    for key in keys:
                        raw = txn.get(key)
                        payload = None if raw is None else unpack_value(raw, now)[1]
                        values.append(None if payload is None else bytes(payload))
                    return values
            except lmdb.MapResizedError:
                if attempt or self._borrowed:
                    raise
                self._adopt_map_size()
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._cond.wait()
        _release_env(self.path, store=False)

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[lmdb.Environment]:
        with self._cond:
            while self._remapping:
                self._cond.wait()
            if self._closed:
                raise Unavailable(f"the cache reader for {self.path} is closed")
            self._active += 1
        try:
            with self._read_slots:
                yield self._env
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _adopt_map_size(self) -> None:
        with self._cond:
            if self._remapping:
                while self._remapping:
                    self._cond.wait()
                return
            self._remapping = True
            try:
                while self._active:
                    self._cond.wait()
                # Size 0 = adopt the writer's map size (LMDB's documented answer to
                # MDB_MAP_RESIZED); this never changes the database itself.
                self._env.set_mapsize(0)
            finally:
                self._remapping = False
                self._cond.notify_all()
