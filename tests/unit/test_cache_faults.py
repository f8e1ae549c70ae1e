"""Faults of the LMDB cache core, each asserting what was kept: a full disk during a
commit, a reader table full of live readers, a reader process killed inside a read
transaction, access hints from a zero-hop reader (absurd ones included), and a writer whose
callers give up, whose batch hits a bug, or which dies. Real LMDB, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from cache_service.store import MAX_HINT_COUNT, CacheReader, CacheStore
from onehop.errors import Internal, ResourceExhausted, Unavailable

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
KiB = 1 << 10
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=ENV,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        **kwargs,
    )


_DISK_FULL_SCRIPT = """
import os, resource, signal, sys
from pathlib import Path
from cache_service.store import CacheStore
from onehop.errors import ResourceExhausted

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG/EIO
path = Path(sys.argv[1])
store = CacheStore(path, 64 << 20)
store.put_many([(f"pred/m/{i}".encode(), b"v%d" % i) for i in range(100)])
# The disk is "full" 16 KiB past what the acknowledged entries use.
size = os.path.getsize(path / "data.mdb")
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 16 * 1024, resource.RLIM_INFINITY))
try:
    store.put(b"shard/d/big", os.urandom(4 << 20))
    print("accepted")
except ResourceExhausted as exc:
    print("exhausted:", exc.message)
print("still serving:", store.get(b"pred/m/42"))
print("entries:", store.stats().namespaces["pred"].entries)
store.close()
"""


def test_disk_full_during_commit_is_resource_exhausted_and_keeps_earlier_data(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cache"
    child = python(_DISK_FULL_SCRIPT, str(path))
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("exhausted: the cache could not write to its disk"), out
    assert lines[1:] == ["still serving: b'v42'", "entries: 100"]

    with CacheStore(path, 64 << 20) as store:  # reopened without the limit
        assert store.stats().namespaces["pred"].entries == 100
        assert "shard" not in store.stats().namespaces
        assert store.get_many([b"pred/m/0", b"pred/m/99", b"shard/d/big"]) == [
            b"v0",
            b"v99",
            None,
        ]


# Takes every free reader slot (each read transaction holds one), then waits.
_HOLDER_SCRIPT = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=True, map_size=0)
txns = []
while True:
    try:
        txns.append(env.begin())
    except lmdb.ReadersFullError:
        break
print(len(txns), flush=True)
sys.stdin.readline()
"""

# A zero-hop reader process: one key per line in, one JSON answer per line out.
_READER_SCRIPT = """
import json, sys
from pathlib import Path
from cache_service.store import CacheReader
from onehop.errors import OnehopError
with CacheReader(Path(sys.argv[1])) as reader:
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            value = reader.get_many([line.strip().encode()])[0]
            answer = {"value": None if value is None else value.decode()}
        except OnehopError as exc:
            answer = {"error": type(exc).__name__, "message": exc.message}
        print(json.dumps(answer), flush=True)
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def ask(reader: subprocess.Popen, key: str) -> dict:
    assert reader.stdin is not None and reader.stdout is not None
    reader.stdin.write(key + "\n")
    reader.stdin.flush()
    return json.loads(reader.stdout.readline())


def test_full_reader_table_then_a_killed_reader_is_cleared_and_the_writer_goes_on(
    tmp_path: Path, children: list[subprocess.Popen]
) -> None:
    path = tmp_path / "cache"
    # A 2 MiB map: rewriting 6 MiB below needs the pages a dead reader's snapshot pins.
    with CacheStore(path, 512 * KiB, max_readers=8, map_size=2 << 20) as store:
        store.put(b"pred/m/kept", b"kept")
        reader = python(_READER_SCRIPT, str(path))  # holds a slot only while it reads
        children.append(reader)
        assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
        holder = python(_HOLDER_SCRIPT, str(path))
        children.append(holder)
        assert holder.stdout is not None
        assert int(holder.stdout.readline()) >= 1

        # Every slot is taken by a live process: readers are told so (RESOURCE_EXHAUSTED;
        # the gateway then bypasses the cache) ...
        answer = ask(reader, "pred/m/kept")
        assert answer["error"] == "ResourceExhausted", answer
        assert "reader slots" in answer["message"]
        with pytest.raises(ResourceExhausted, match="reader slots"):
            store.get(b"pred/m/kept")
        # ... while the writer, which needs no reader slot, goes on.
        store.put(b"pred/m/during", b"written while full")
        assert store.contains_many([b"pred/m/kept", b"pred/m/during"]) == [True, True]

        holder.kill()  # SIGKILL inside its read transactions: the slots stay behind
        holder.wait(timeout=30)
        assert f"{holder.pid} " in store._env.readers()

        # 6 MiB of rewrites through the 2 MiB map: only possible once the dead reader's
        # snapshot no longer pins the pages that each rewrite frees.
        last = {}
        for round_ in range(96):
            key = f"shard/d/{round_ % 4}".encode()
            last[key] = os.urandom(64 * KiB).hex().encode()[: 64 * KiB]
            store.put(key, last[key])
        assert f"{holder.pid} " not in store._env.readers()
        assert store.get_many(list(last)) == list(last.values())
        assert ask(reader, "shard/d/3") == {"value": last[b"shard/d/3"].decode()}


def test_clear_stale_readers_counts_the_slots_of_a_dead_process(
    tmp_path: Path, children: list[subprocess.Popen]
) -> None:
    path = tmp_path / "cache"
    with CacheStore(path, 512 * KiB, max_readers=8) as store:
        holder = python(_HOLDER_SCRIPT, str(path))
        children.append(holder)
        assert holder.stdout is not None
        held = int(holder.stdout.readline())
        assert store.clear_stale_readers() == 0  # alive: nothing to clear
        holder.kill()
        holder.wait(timeout=30)
        assert store.clear_stale_readers() == held
        store.put(b"pred/m/after", b"ok")
        assert store.get(b"pred/m/after") == b"ok"


def test_reader_hints_feed_eviction_and_stats(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    budget = 128 * KiB
    with CacheStore(path, budget) as store:
        hot = [f"pred/m/{i}".encode() for i in range(32)]
        store.put_many([(key, os.urandom(KiB)) for key in hot])
        with CacheReader(path, max_hints=40) as reader:
            assert None not in reader.get_many(hot)
            assert reader.get_many([b"pred/m/none", b"shard/d/none"]) == [None, None]
            reader.get_many(hot[:10])  # 42 hits for room for 40: two dropped
            hints = reader.take_hints()
        assert len(hints.hits) == 40 and hints.dropped == 2
        assert hints.misses == {"pred": 1, "shard": 1}
        assert reader.take_hints().hits == []  # handed over

        applied = store.note_remote_reads([*hints.hits, b"pred/m/gone", b""], hints.misses, 2)
        assert applied == 40
        stats = store.stats()
        assert (stats.namespaces["pred"].hits, stats.namespaces["pred"].misses) == (40, 1)
        assert stats.hints_dropped == 2

        # The hinted keys were read (elsewhere): a sweep of shards must not flush them.
        for i in range(64):
            store.put(f"shard/d/{i}".encode(), os.urandom(8 * KiB))
        assert None not in store.get_many(hot)
        assert store.stats().namespaces["pred"].evictions == 0


def test_readers_full_in_process_is_resource_exhausted(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    with CacheStore(path, 512 * KiB, max_readers=4) as store:
        store.put(b"pred/m/a", b"a")
        held = []
        try:
            while True:
                held.append(store._env.begin())
        except lmdb.ReadersFullError:
            pass
        try:
            with pytest.raises(ResourceExhausted, match="reader slots"):
                store.get(b"pred/m/a")
        finally:
            for txn in held:
                txn.abort()
            held.clear()  # py-lmdb frees a slot with the transaction object
        assert store.get(b"pred/m/a") == b"a"


class GatedClock:
    """A clock the writer calls at the start of each commit: `hold()` makes the next call
    wait (the writer stuck mid-batch, as in a frozen process) until `release()`; `fail`
    makes the next call raise it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail: BaseException | None = None

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def __call__(self) -> float:
        self.entered.set()
        self.gate.wait(30)
        error, self.fail = self.fail, None
        if error is not None:
            raise error
        return time.time()


def test_puts_cancelled_while_queued_are_dropped_and_the_writer_goes_on(tmp_path: Path) -> None:
    """A Put whose caller gave up (the servicer cancels its future at the deadline) used to
    kill the writer with InvalidStateError; every later write then hung."""
    clock = GatedClock()
    with CacheStore(tmp_path / "cache", 1 << 20, clock=clock) as store:
        clock.hold()
        first = store.submit_put_many([(b"pred/m/first", b"1")])
        assert clock.entered.wait(10)  # the writer is inside first's commit
        given_up = store.submit_put_many([(b"pred/m/given-up", b"2")])
        waited = store.submit_put_many([(b"pred/m/waited", b"3")])
        assert given_up.cancel()
        assert not first.cancel()  # already being written: too late to cancel
        clock.release()
        assert first.result(10) == 1 and waited.result(10) == 1
        store.put(b"pred/m/after", b"4")
        assert store.get_many([b"pred/m/first", b"pred/m/given-up", b"pred/m/after"]) == [
            b"1",
            None,
            b"4",
        ]


def test_an_unexpected_error_fails_its_batch_and_the_writer_goes_on(tmp_path: Path) -> None:
    clock = GatedClock()
    with CacheStore(tmp_path / "cache", 1 << 20, clock=clock) as store:
        clock.fail = RuntimeError("a bug in the commit path")
        with pytest.raises(Internal, match="correlation id"):
            store.put(b"pred/m/failed", b"1")
        store.put(b"pred/m/next", b"2")
        assert store.get_many([b"pred/m/failed", b"pred/m/next"]) == [None, b"2"]


class _WriterKilled(BaseException):
    """Escapes every `except Exception`: stands for a bug that ends the writer thread."""


def test_a_dead_writer_fails_writes_fast_and_says_so(tmp_path: Path) -> None:
    clock = GatedClock()
    died = threading.Event()
    with CacheStore(tmp_path / "cache", 1 << 20, clock=clock, on_writer_death=died.set) as store:
        store.put(b"pred/m/kept", b"1")
        clock.hold()
        clock.fail = _WriterKilled()
        in_flight = store.submit_put_many([(b"pred/m/in-flight", b"2")])
        assert clock.entered.wait(10)
        queued = store.submit_put_many([(b"pred/m/queued", b"3")])
        clock.release()
        assert died.wait(10)
        for future in (in_flight, queued):
            with pytest.raises(Unavailable, match="writer has stopped"):
                future.result(10)
        with pytest.raises(Unavailable, match="writer has stopped"):
            store.put(b"pred/m/later", b"4")
        assert store.get(b"pred/m/kept") == b"1"  # reads still served


def test_absurd_hint_counts_are_skipped_and_leave_the_stats_alone(tmp_path: Path) -> None:
    with CacheStore(tmp_path / "cache", 1 << 20) as store:
        store.note_remote_reads([], {"pred": 3}, 1)
        for _ in range(2):  # twice: the sums used to pass 2**64
            store.note_remote_reads([], {"pred": 2**64 - 1, "shard": MAX_HINT_COUNT + 1}, 2**64 - 1)
        store.note_remote_reads([], {"pred": MAX_HINT_COUNT}, MAX_HINT_COUNT)
        stats = store.stats()
    assert stats.namespaces["pred"].misses == 3 + MAX_HINT_COUNT
    assert "shard" not in stats.namespaces
    assert stats.hints_dropped == 1 + MAX_HINT_COUNT
