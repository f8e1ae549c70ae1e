"""The LMDB cache core (no gRPC): one environment, one writer thread with group commit,
checksummed values with optional TTL, a byte budget with segmented-LRU eviction, and
per-namespace stats. `CacheReader` opens the same environment read-only from another
process on this host, for zero-hop hits (DESIGN §3).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import queue
import struct
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import xxhash

from cache_service.policy import SegmentedLru
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
MAX_NAMESPACE_CHARS = 64
# The map is virtual address space, not disk: room for B-tree pages, overflow-page rounding
# and the copy-on-write pages a commit needs, on top of the budget.
MAP_HEADROOM_BYTES = 64 << 20
# Group commit: one write transaction takes at most this much work.
MAX_BATCH_OPS = 1024
MAX_BATCH_BYTES = 64 << 20
# Reader-table housekeeping (slots of dead processes) and TTL sweeps, on the writer thread.
MAINTENANCE_SECONDS = 30.0
MAP_FULL_RETRIES = 8
# Reads whose bookkeeping waits in a queue: the writer is asked to apply it at BOOKKEEP_AT
# queued reads; a reader applies it itself at MAX_PENDING_READS (the writer is busy).
BOOKKEEP_AT = 32
MAX_PENDING_READS = 1024
# Hit keys a zero-hop reader keeps for the store between two hint batches; beyond, dropped.
MAX_HINTS = 8192
# The most reads one hint may report (misses of a namespace, dropped hits): far more than a
# reader serves between two hint batches, far less than would overflow a uint64 counter.
MAX_HINT_COUNT = 1 << 40
# How long close() waits for pinned reads (streams still sending from the map) to end.
PIN_DRAIN_SECONDS = 10.0
DEFAULT_NAMESPACE = "default"

Clock = Callable[[], float]
T = TypeVar("T")


# --- value format (shared by the store and the reader so they cannot drift) ---------------
#
# header = checksum (uint64) | expiry unix seconds (uint64, 0 = never), little-endian. The
# checksum is XXH3-64 of the expiry field and the payload (contiguous, so one call checks
# both): a flipped bit in either reads as corrupt. XXH3 rather than zlib's crc32: several
# times faster per value, and the checksum is most of the cost of a hit.

HEADER = struct.Struct("<QQ")
_CHECKED_FROM = 8  # the checksum covers everything after itself
_EXPIRY = struct.Struct("<Q")
OK, CORRUPT, EXPIRED = "ok", "corrupt", "expired"


def pack_value(payload: Any, expiry: int) -> bytes:
    """Header + payload, ready for LMDB. `payload` is any bytes-like object."""
    checksum = xxhash.xxh3_64(_EXPIRY.pack(expiry))
    checksum.update(payload)
    return b"".join((HEADER.pack(checksum.intdigest(), expiry), payload))


def unpack_value(raw: Any, now: float) -> tuple[str, memoryview | None]:
    """(OK, payload view) or (EXPIRED | CORRUPT, None) for a stored value."""
    view = memoryview(raw)
    if len(view) < HEADER.size:
        return CORRUPT, None
    checksum, expiry = HEADER.unpack_from(view)
    if xxhash.xxh3_64_intdigest(view[_CHECKED_FROM:]) != checksum:
        return CORRUPT, None
    if expiry and now >= expiry:
        return EXPIRED, None
    return OK, view[HEADER.size :]


Views = list[memoryview | None]


def read_views(
    txn: lmdb.Transaction, keys: Sequence[bytes], now: float
) -> tuple[Views, list[bytes], list[bytes], list[tuple[bytes, str]]]:
    """Look up `keys` in a read transaction opened with buffers=True: (payloads in key order
    as views into the map, None for a miss; hit keys; miss keys; [(bad key, CORRUPT |
    EXPIRED)]). The views are valid only while the transaction is open: copy them out
    before it ends. `unpack_value` inlined: this loop is the cost of a batch read."""
    get: Callable[[bytes], memoryview | None] = txn.get  # type: ignore[assignment]
    header, digest, size = HEADER.unpack_from, xxhash.xxh3_64_intdigest, HEADER.size
    values: Views = []
    hits: list[bytes] = []
    misses: list[bytes] = []
    bad: list[tuple[bytes, str]] = []
    for key in keys:
        raw = get(key)  # a memoryview into the map
        if raw is not None:
            if len(raw) >= size:
                checksum, expiry = header(raw)
                if digest(raw[_CHECKED_FROM:]) == checksum:
                    if not expiry or now < expiry:
                        values.append(raw[size:])
                        hits.append(key)
                        continue
                    bad.append((key, EXPIRED))
                else:
                    bad.append((key, CORRUPT))
            else:
                bad.append((key, CORRUPT))
        values.append(None)
        misses.append(key)
    return values, hits, misses, bad


def copy_views(views: Views) -> list[bytes | None]:
    return [None if view is None else bytes(view) for view in views]


class PinnedValue:
    """One value read in place: `view` points into the memory map, valid while the read
    transaction behind it is open. That transaction (and its reader slot) ends at
    `release()`, or when the last reference to this object goes, whichever comes first, so
    a consumer that hands `view` on (Arrow buffers, a Flight stream) keeps the value valid
    by keeping this object alive as the owner of what it hands on. Idempotent."""

    __slots__ = ("view", "_release", "__weakref__")

    def __init__(self, view: memoryview, release: Callable[[], None] | None = None):
        self.view = view
        self._release = weakref.finalize(self, release) if release is not None else None

    @property
    def pinned(self) -> bool:
        """Whether a read transaction is still held for this value (False for a copy)."""
        return self._release is not None and self._release.alive

    def release(self) -> None:
        if self._release is not None:
            self._release()


@dataclass(frozen=True)
class PackedValues:
    """A batch read as one buffer: the values found, back to back in key order, with the
    size of each (0 for a miss). `BatchGet` sends this instead of one protobuf field per
    value: one copy out of the map, no per-value objects on either side."""

    found: list[bool]
    sizes: list[int]
    data: bytes

    @classmethod
    def of(cls, views: Views) -> PackedValues:
        return cls(
            [view is not None for view in views],
            [0 if view is None else len(view) for view in views],
            b"".join([view for view in views if view is not None]),
        )

    def values(self) -> list[bytes | None]:
        """The values in key order, None for a miss."""
        data = memoryview(self.data)
        values: list[bytes | None] = []
        offset = 0
        for found, size in zip(self.found, self.sizes, strict=True):
            if found:
                values.append(bytes(data[offset : offset + size]))
                offset += size
            else:
                values.append(None)
        if offset != len(data):
            raise InvalidArgument(f"packed values hold {len(data)} bytes, their sizes say {offset}")
        return values


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


def check_keys(keys: Iterable[Any]) -> list[bytes]:
    """`check_key` over a batch, with a fast path for the usual well-formed keys."""
    return [
        key if type(key) is bytes and 0 < len(key) <= MAX_KEY_BYTES else check_key(key)
        for key in keys
    ]


def _show(key: bytes) -> str:
    return key[:64].decode("utf-8", "backslashreplace")


# What a failed write to a full disk (or a file-size limit) looks like from LMDB: ENOSPC,
# or EIO when the kernel accepted only part of a page write.
_DISK_FULL_TEXT = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EFBIG, errno.EIO))
_DISK_FULL_TEXT += (os.strerror(errno.EDQUOT),) if hasattr(errno, "EDQUOT") else ()


def _is_disk_full(exc: lmdb.Error) -> bool:
    return isinstance(exc, lmdb.DiskError) or any(text in str(exc) for text in _DISK_FULL_TEXT)


def _begin_read(env: lmdb.Environment) -> lmdb.Transaction:
    """A read transaction (buffers=True); a reader table full of other processes' slots is
    first swept for dead ones, then RESOURCE_EXHAUSTED (the caller treats it as load)."""
    try:
        return env.begin(buffers=True)
    except lmdb.ReadersFullError:
        try:
            env.reader_check()
            return env.begin(buffers=True)
        except lmdb.ReadersFullError:
            raise ResourceExhausted(
                f"all {env.max_readers()} LMDB reader slots of the cache are taken by live "
                "readers; retry, or raise max_readers"
            ) from None


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
    except lmdb.ReadersFullError:  # opening reads the main database once
        raise ResourceExhausted(
            f"all LMDB reader slots of the cache at {path} are taken; retry later"
        ) from None
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
        # remap here; lock=True registers our read slots where the writer can see them;
        # no spare transactions, so an idle reader holds no slot of the shared table.
        env = _open_env(path, readonly=True, lock=True, map_size=0, max_spare_txns=0)
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
    # Access hints that zero-hop readers dropped for lack of room (see `ReadHints`).
    hints_dropped: int = 0


@dataclass(slots=True)
class _Entry:
    size: int
    expiry: int


# --- the writer's work items -------------------------------------------------------------

_PUT, _DELETE, _REMOVE_IF_BAD = "put", "delete", "remove_if_bad"
# Not a write: apply the queued read bookkeeping, on the writer's thread.
_BOOKKEEP = "bookkeep"


@dataclass
class _Op:
    kind: str
    # put: [(key, stored value, expiry)]; delete / remove_if_bad: [key]
    items: list[Any]
    nbytes: int = 0
    # Resolved by the writer once the op's commit is durable (or failed).
    future: Future[int] = field(default_factory=Future)


_STOP = object()
_WRITER_DEAD = "the cache writer has stopped: the cache takes no writes until it restarts"


def _settle(op: _Op, result: int = 0, error: BaseException | None = None) -> None:
    """Resolve an op's future unless it is already done: only the writer resolves one, so
    checking first is enough (the future is RUNNING, its caller can no longer cancel it)."""
    if op.future.done():
        return
    if error is None:
        op.future.set_result(result)
    else:
        op.future.set_exception(error)


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
        on_writer_death: Callable[[], None] | None = None,
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
        # Pinned reads (`get_pinned`) hold their slot for a whole stream, so they may take
        # only half of ours: short reads always find a slot.
        self._max_pins = max(1, max_readers // 4)
        self._pins = 0
        self._pins_changed = threading.Condition()
        # key -> the stored checksum of the value `get_pinned` last verified for it.
        self._verified: dict[bytes, int] = {}
        self._lock = threading.Lock()  # the index, recency and counters
        self._entries: dict[bytes, _Entry] = {}
        self._policy = SegmentedLru(capacity_bytes)
        self._counters: dict[str, NamespaceStats] = {}
        self._by_head: dict[bytes, NamespaceStats] = {}
        self._reads: deque[tuple[list[bytes], list[bytes]]] = deque()
        self._bookkeeping_queued = False
        self.used_bytes = 0
        self._commits = 0
        self._hints_dropped = 0
        try:
            self._env.reader_check()  # slots left by dead processes
            self._load_index()
        except BaseException:
            _release_env(self.path, store=True)
            raise

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # C: cheap per put
        self._state_lock = threading.Lock()
        self._closed = False
        self._writer_dead = False
        self._on_writer_death = on_writer_death
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
        return self._read(keys, copy_views)

    def get_packed(self, keys: Sequence[bytes]) -> PackedValues:
        """`get_many` as one buffer (see `PackedValues`)."""
        return self._read(keys, PackedValues.of)

    def _read(self, keys: Sequence[bytes], copy_out: Callable[[Views], T]) -> T:
        keys = check_keys(keys)
        self._check_open()
        now = self._clock()
        with self._read_slots, _begin_read(self._env) as txn:
            views, hits, misses, bad = read_views(txn, keys, now)
            values = copy_out(views)  # before the snapshot ends
        self._record_reads(hits, misses)
        self._drop_bad(bad)
        return values

    def get_pinned(self, key: bytes) -> PinnedValue | None:
        """One value without a copy: a view into the memory map whose read transaction
        stays open until the PinnedValue is released or dropped (see `PinnedValue`); None
        for a miss (absent, expired or corrupt). For large values streamed out as they
        lie: a stream holds its value as long as it sends it.

        Checksum: verified on the first pinned read of each stored value since this store
        opened, then remembered by the value's stored checksum, so a value written again
        (or replaced) is verified again; re-hashing a value of many MiB on every read would
        cost a tenth of a stream's time. So a value corrupted on disk before this process
        first reads it is caught, as by every other read; a bit flipped in memory later is
        not. When every pin is taken (slow streams), the value is copied out instead."""
        key = check_key(key)
        self._check_open()
        with self._pins_changed:
            pinning = self._pins < self._max_pins
            self._pins += pinning
        if not pinning:
            value = self.get(key)
            return None if value is None else PinnedValue(memoryview(value))
        self._read_slots.acquire()
        try:
            txn = _begin_read(self._env)
        except BaseException:
            self._unpin(None)
            raise
        try:
            view, state = self._read_in_place(txn, key)
        except BaseException:
            self._unpin(txn)
            raise
        if view is None:
            self._unpin(txn)
            self._record_reads([], [key])
            if state:
                self._drop_bad([(key, state)])
            return None
        self._record_reads([key], [])
        return PinnedValue(view, lambda: self._unpin(txn))

    def _read_in_place(self, txn: lmdb.Transaction, key: bytes) -> tuple[memoryview | None, str]:
        """(payload view, "") for a live value; (None, "" | CORRUPT | EXPIRED) otherwise."""
        raw: memoryview | None = txn.get(key)  # type: ignore[assignment]
        if raw is None:
            return None, ""
        if len(raw) < HEADER.size:
            return None, CORRUPT
        checksum, expiry = HEADER.unpack_from(raw)
        if self._verified.get(key) != checksum:
            if xxhash.xxh3_64_intdigest(raw[_CHECKED_FROM:]) != checksum:
                return None, CORRUPT
            self._verified[key] = checksum
        if expiry and self._clock() >= expiry:
            return None, EXPIRED
        return raw[HEADER.size :], ""

    def _unpin(self, txn: lmdb.Transaction | None) -> None:
        if txn is not None:
            txn.abort()
        self._read_slots.release()
        with self._pins_changed:
            self._pins -= 1
            self._pins_changed.notify_all()

    @property
    def pinned_reads(self) -> int:
        """Pinned reads (`get_pinned`) whose transaction is still open."""
        return self._pins

    def _drop_bad(self, bad: list[tuple[bytes, str]]) -> None:
        """Count values found corrupt or expired and have the writer remove them."""
        if not bad:
            return
        with self._lock:
            for key, state in bad:
                counters = self._counters_of(key)
                if state == CORRUPT:
                    counters.corrupt += 1
                    log.warning("corrupt cache value for %s: removed", _show(key))
                else:
                    counters.expired += 1
        self._submit(_Op(_REMOVE_IF_BAD, [key for key, _ in bad]), wait=False)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key holds a live value (from the index: no LMDB read, no stats)."""
        keys = check_keys(keys)
        self._check_open()
        now = self._clock()
        with self._lock:
            found = []
            for key in keys:
                entry = self._entries.get(key)
                found.append(entry is not None and not (entry.expiry and now >= entry.expiry))
            return found

    def note_remote_reads(
        self, hits: Iterable[bytes], misses: Mapping[str, int], dropped: int = 0
    ) -> int:
        """Fold in what a zero-hop reader served from the memory map (its `ReadHints`):
        hits count and renew the keys for eviction like local reads, misses count. Hints
        are advisory: unknown or malformed keys are skipped, and so is a count over
        MAX_HINT_COUNT (no reader's: summed into the stats it would overflow them). Returns
        the keys applied."""
        applied = 0
        with self._lock:
            if 0 < dropped <= MAX_HINT_COUNT:
                self._hints_dropped += dropped
            for key in hits:
                if isinstance(key, bytes) and self._policy.touch(key):
                    self._counters_of(key).hits += 1
                    applied += 1
            for namespace, count in misses.items():
                if 0 < len(namespace) <= MAX_NAMESPACE_CHARS and 0 < count <= MAX_HINT_COUNT:
                    self._ns(namespace).misses += count
        return applied

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction (their
        old snapshot would otherwise pin pages forever). Returns how many were cleared."""
        cleared = self._env.reader_check()
        if cleared:
            log.warning("cleared %d stale LMDB reader slots of dead processes", cleared)
        return int(cleared)

    # --- writes --------------------------------------------------------------------------

    def put(self, key: bytes, value: Any, ttl_seconds: int = 0) -> None:
        self.put_many([(key, value)], ttl_seconds)

    def put_many(self, items: Sequence[tuple[bytes, Any]], ttl_seconds: int = 0) -> int:
        """Store every item (all or none are accepted) and wait until they are durable."""
        return self.submit_put_many(items, ttl_seconds).result()

    def submit_put_many(
        self, items: Sequence[tuple[bytes, Any]], ttl_seconds: int = 0
    ) -> Future[int]:
        """`put_many` without the wait: checks and queues the items for the writer (bad
        input raises here) and returns a future that resolves to their count once their
        commit is durable, or fails with the commit's error. For callers that must not
        hold a thread per pending write: group commit batches what is queued, so more
        writes waiting = bigger, cheaper commits."""
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
        op = _Op(_PUT, packed, nbytes=total)
        if not packed:
            op.future.set_result(0)
            return op.future
        self._enqueue(op)
        return op.future

    def delete_many(self, keys: Sequence[bytes]) -> int:
        """Remove the keys; returns how many existed."""
        keys = check_keys(keys)
        return self._submit(_Op(_DELETE, keys)) if keys else 0

    # --- stats and lifecycle -------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self._lock:
            self._apply_reads()
            namespaces = {
                name: dataclasses.replace(counters) for name, counters in self._counters.items()
            }
            return StoreStats(
                namespaces,
                self.capacity_bytes,
                self.used_bytes,
                self._commits,
                self._hints_dropped,
            )

    def close(self) -> None:
        """Finish the queued writes, stop the writer, wait for pinned reads to end, close
        the environment."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        with self._pins_changed:
            drained = self._pins_changed.wait_for(lambda: self._pins == 0, PIN_DRAIN_SECONDS)
        if not drained:
            # Unmapping now would pull the memory from under a stream still sending it.
            log.warning("cache closed with %d pinned reads still open: map left open", self._pins)
            return
        _release_env(self.path, store=True)

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals: index ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the cache store is closed")

    def _record_reads(self, hits: list[bytes], misses: list[bytes]) -> None:
        """Queue a read's bookkeeping (hit/miss counts, recency) instead of doing it on the
        request path, as Caffeine's read buffer does: the writer thread applies the queue
        when it grows (between requests, while the serving thread waits on the network),
        before it picks victims, and `stats()` before it reports. A reader applies it
        itself only if the writer falls far behind."""
        reads = self._reads
        reads.append((hits, misses))
        if len(reads) >= BOOKKEEP_AT and not self._bookkeeping_queued:
            self._bookkeeping_queued = True
            self._submit(_Op(_BOOKKEEP, []), wait=False)
        elif len(reads) >= MAX_PENDING_READS:
            with self._lock:
                self._apply_reads()

    def _apply_reads(self) -> None:
        """Replay queued reads into the counters and the policy (caller holds _lock)."""
        reads = self._reads
        while reads:
            hits, misses = reads.popleft()
            self._policy.touch_many(hits)
            for keys, field_name in ((hits, "hits"), (misses, "misses")):
                for counters, count in self._count_by_namespace(keys):
                    setattr(counters, field_name, getattr(counters, field_name) + count)

    def _count_by_namespace(self, keys: list[bytes]) -> Iterator[tuple[NamespaceStats, int]]:
        """(counters, how many of `keys` are theirs): one C-level pass when the batch shares
        its first key's namespace, as a batch almost always does."""
        if not keys:
            return
        first = keys[0]
        slash = first.find(b"/")
        if slash > 0:
            prefix = first[: slash + 1]
            same = sum(map(bytes.startswith, keys, repeat(prefix)))
            if same == len(keys):
                yield self._counters_of(first), same
                return
        for key in keys:
            yield self._counters_of(key), 1

    def _counters_of(self, key: bytes) -> NamespaceStats:
        """`_ns(namespace_of(key))`, memoised by the key's raw prefix: it runs per key read."""
        slash = key.find(b"/")
        head = key[:slash] if slash > 0 else b""
        counters = self._by_head.get(head)
        if counters is None:
            counters = self._by_head[head] = self._ns(namespace_of(key))
        return counters

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
                self._set_entry(key, _Entry(len(key) + len(raw), peek_expiry(raw)))
        if self._entries:
            log.info("cache opened warm: %d entries, %d bytes", len(self._entries), self.used_bytes)

    def _set_entry(self, key: bytes, entry: _Entry | None, *, evicted: bool = False) -> None:
        """Apply one committed change to the index (caller holds _lock or is the opener)."""
        old = self._entries.pop(key, None)
        self._verified.pop(key, None)
        if old is not None:
            counters = self._counters_of(key)
            counters.entries -= 1
            counters.bytes -= old.size
            counters.evictions += evicted
            self.used_bytes -= old.size
        if entry is None:
            self._policy.remove(key)
            return
        counters = self._counters_of(key)
        counters.entries += 1
        counters.bytes += entry.size
        self.used_bytes += entry.size
        self._entries[key] = entry
        self._policy.add(key, entry.size)

    # --- internals: the writer -----------------------------------------------------------

    def _submit(self, op: _Op, wait: bool = True) -> int:
        if not wait:
            with self._state_lock:
                if not (self._closed or self._writer_dead):
                    self._queue.put(op)
            return 0
        self._enqueue(op)
        return op.future.result()

    def _enqueue(self, op: _Op) -> None:
        with self._state_lock:
            if self._closed:
                raise Unavailable("the cache store is closed")
            if self._writer_dead:
                raise Unavailable(_WRITER_DEAD)
            self._queue.put(op)

    def _run_writer(self) -> None:
        """The writer thread. A failed commit fails its batch, and an unexpected error in
        one batch fails that batch alone: the thread goes on. Should it end all the same
        (a bug), nothing may wait on it: queued and later writes fail with UNAVAILABLE,
        and `on_writer_death` is told (the server turns its health NOT_SERVING)."""
        try:
            self._write_until_stopped()
        except BaseException:
            log.critical("the cache writer died: the cache takes no more writes", exc_info=True)
            with self._state_lock:
                self._writer_dead = True
            error = Unavailable(_WRITER_DEAD)
            while True:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is not _STOP and op.future.set_running_or_notify_cancel():
                    op.future.set_exception(error)
            if self._on_writer_death is not None:
                self._on_writer_death()

    def _write_until_stopped(self) -> None:
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
            # A write whose caller gave up (cancelled its future: a Put past its deadline)
            # is dropped; the others turn RUNNING, so no caller can cancel them any more
            # and resolving their futures below cannot fail.
            batch = [op for op in batch if op.future.set_running_or_notify_cancel()]
            try:
                self._apply_batch(batch)
            except Exception as exc:  # a bug, not a failed commit: fail this batch, go on
                self._finish(batch, error=Internal.wrap(exc))
            except BaseException:
                self._finish(batch, error=Unavailable(_WRITER_DEAD))
                raise

    def _apply_batch(self, batch: list[_Op]) -> None:
        """Apply the queued read bookkeeping if the batch asks for it; commit its writes."""
        writes = [op for op in batch if op.kind != _BOOKKEEP]
        if len(writes) < len(batch):
            self._bookkeeping_queued = False
            with self._lock:
                self._apply_reads()
        if writes:
            self._commit_batch(writes)

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
        except lmdb.Error as exc:
            if not _is_disk_full(exc):
                self._finish(batch, error=Internal.wrap(exc))
                return
            # LMDB aborted the transaction: the last commit (all earlier data) stands.
            log.error("cache commit failed, disk full? (%s)", exc)
            self._finish(
                batch,
                error=ResourceExhausted(
                    "the cache could not write to its disk (full?); earlier entries are kept, "
                    "retry later or free disk space"
                ),
            )
            return
        except Exception as exc:  # keep the writer alive; callers see INTERNAL
            self._finish(batch, error=Internal.wrap(exc))
            return
        for op, result in zip(batch, results, strict=True):
            _settle(op, result)

    @staticmethod
    def _finish(batch: list[_Op], error: BaseException) -> None:
        for op in batch:
            _settle(op, error=error)

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
                        pending[key] = _Entry(len(key) + len(stored), expiry)
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
                self._apply_reads()  # eviction must see every read so far
                growth = sum(
                    (entry.size if entry else 0) - self._size_of(key)
                    for key, entry in pending.items()
                )
                victims = self._policy.victims(
                    self.used_bytes + growth - self.capacity_bytes, pending
                )
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
        self.clear_stale_readers()  # a dead reader's snapshot pins pages
        with self._lock:
            self._apply_reads()
            victims = self._policy.victims(max(2 * needed, self.used_bytes // 8, 1))
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
            self.clear_stale_readers()
            now = self._clock()
            with self._lock:
                expired = [k for k, e in self._entries.items() if e.expiry and now >= e.expiry]
            if expired:
                self._write_once([_Op(_REMOVE_IF_BAD, expired)])
        except Exception:
            log.exception("cache maintenance failed")


@dataclass
class ReadHints:
    """What a zero-hop reader served since it was last asked: the keys it hit (they renew
    those entries for eviction and count as hits at the store), misses per namespace, and
    how many hit keys it dropped because its buffer was full (hints are advisory)."""

    hits: list[bytes]
    misses: dict[str, int]
    dropped: int = 0


class CacheReader:
    """Read-only view of a cache environment on this host: hits straight from the memory
    map, zero hops. Checksums and expiry are verified exactly as the store does; a bad or
    expired value is a miss here and is left for the store (the only writer) to remove.

    What it serves is remembered, bounded by `max_hints`, for `take_hints()`: the owner
    sends those hints to the cache service in batches (`cache_service.client.HintSender`)
    so that entries read only here are not evicted as if nobody wanted them.
    """

    def __init__(self, path: Path, *, clock: Clock = time.time, max_hints: int = MAX_HINTS):
        self.path = Path(path)
        self._clock = clock
        self._env, self._borrowed = _acquire_reader_env(self.path)
        if not self._borrowed:
            self._env.reader_check()  # slots of dead processes, as the store does at start
        self._closed = False
        # Read slots this process may hold at once, as tokens: a read takes one, and the
        # rare exclusive work (adopting a resized map, close) takes them all. A queue of
        # tokens costs far less per read than a Condition.
        self._slots = max(1, self._env.max_readers() // 4)
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(self._slots):
            self._tokens.put(None)
        self._exclusive = threading.Lock()
        self._max_hints = max_hints
        self._hint_lock = threading.Lock()
        self._hits: list[bytes] = []
        self._misses: Counter[str] = Counter()
        self._dropped = 0

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in key order; None for a miss (absent, expired or corrupt)."""
        keys = check_keys(keys)
        for attempt in range(2):
            self._tokens.get()
            try:
                if self._closed:
                    raise Unavailable(f"the cache reader for {self.path} is closed")
                with _begin_read(self._env) as txn:
                    views, hits, misses, _ = read_views(txn, keys, self._clock())
                    values = copy_views(views)
                break
            except lmdb.MapResizedError:
                if attempt or self._borrowed:
                    raise
            finally:
                self._tokens.put(None)
            self._adopt_map_size()
        self._remember(hits, misses)
        return values

    def take_hints(self) -> ReadHints:
        """The hints gathered since the last call, handing them over."""
        with self._hint_lock:
            hints = ReadHints(self._hits, dict(self._misses), self._dropped)
            self._hits, self._misses, self._dropped = [], Counter(), 0
        return hints

    def close(self) -> None:
        """Wait for reads in flight, then let go of the environment."""
        with self._exclusive:
            if self._closed:
                return
            self._closed = True
            for _ in range(self._slots):  # every token back = no read in flight
                self._tokens.get()
            for _ in range(self._slots):
                self._tokens.put(None)
        _release_env(self.path, store=False)

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remember(self, hits: list[bytes], misses: list[bytes]) -> None:
        with self._hint_lock:
            room = self._max_hints - len(self._hits)
            self._hits.extend(hits[:room])
            self._dropped += max(0, len(hits) - room)
            for key in misses:
                self._misses[namespace_of(key)] += 1

    def _adopt_map_size(self) -> None:
        """The writer reopened with a larger map: adopt it. LMDB allows this only with no
        transaction open in this process, so take every read token first."""
        with self._exclusive:
            if self._closed:
                return
            for _ in range(self._slots):
                self._tokens.get()
            try:
                # Size 0 = adopt the writer's map size (LMDB's documented answer to
                # MDB_MAP_RESIZED); this never changes the database itself.
                self._env.set_mapsize(0)
            finally:
                for _ in range(self._slots):
                    self._tokens.put(None)
