"""The LMDB cache core alone: real LMDB environments under tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import pytest

from cache_service.store import HEADER, MAX_KEY_BYTES, CacheReader, CacheStore, PackedValues
from onehop.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

REPO = Path(__file__).resolve().parents[2]
KiB = 1 << 10


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(path: Path):
    with CacheStore(path, 1 << 20) as store:
        yield store


def corrupt(path: Path, key: bytes) -> None:
    """Flip the last payload byte of `key` behind the (closed) store's back."""
    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(key))
        raw[-1] ^= 0xFF
        txn.put(key, bytes(raw))
    env.close()


def raw_keys(path: Path) -> set[bytes]:
    env = lmdb.open(str(path), readonly=True, map_size=0)
    with env.begin() as txn:
        keys = {bytes(key) for key in txn.cursor().iternext(values=False)}
    env.close()
    return keys


def test_put_get_batch_contains_delete(store: CacheStore) -> None:
    store.put(b"pred/m/a", b"alpha")
    assert store.put_many([(b"pred/m/b", b"beta"), (b"shard/d/1", b"\x00" * 100)]) == 2

    assert store.get(b"pred/m/a") == b"alpha"
    assert store.get(b"pred/m/zz") is None
    assert store.get_many([b"shard/d/1", b"nope/x", b"pred/m/b"]) == [b"\x00" * 100, None, b"beta"]
    assert store.contains_many([b"pred/m/a", b"pred/m/zz"]) == [True, False]

    assert store.delete_many([b"pred/m/a", b"pred/m/zz"]) == 1
    assert store.get(b"pred/m/a") is None
    store.put(b"pred/m/b", b"beta-2")  # overwrite
    assert store.get(b"pred/m/b") == b"beta-2"


def test_namespace_stats(store: CacheStore) -> None:
    store.put_many([(b"pred/m/1", b"x" * 10), (b"pred/m/2", b"y" * 20)])
    store.put(b"shard/d/0", b"z" * 1000)
    store.get_many([b"pred/m/1", b"pred/m/1", b"pred/m/3", b"shard/d/0", b"shard/d/9"])

    stats = store.stats()
    pred, shard = stats.namespaces["pred"], stats.namespaces["shard"]
    assert (pred.hits, pred.misses, pred.entries) == (2, 1, 2)
    assert (shard.hits, shard.misses, shard.entries) == (1, 1, 1)
    assert shard.bytes > 1000 > pred.bytes > 30
    assert stats.used_bytes == pred.bytes + shard.bytes
    assert stats.capacity_bytes == 1 << 20


def test_bad_keys_and_values_are_invalid_argument(store: CacheStore) -> None:
    with pytest.raises(InvalidArgument, match="1-511 bytes"):
        store.put(b"", b"v")
    with pytest.raises(InvalidArgument, match="1-511 bytes, got 512"):
        store.get_many([b"ok", b"k" * (MAX_KEY_BYTES + 1)])
    with pytest.raises(InvalidArgument, match="bytes"):
        store.put(b"pred/x", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="ttl"):
        store.put(b"pred/x", b"v", ttl_seconds=-1)
    store.put(b"k" * MAX_KEY_BYTES, b"longest key")
    assert store.get(b"k" * MAX_KEY_BYTES) == b"longest key"


def test_pinned_read_is_the_stored_value_and_holds_its_snapshot(store: CacheStore) -> None:
    store.put(b"shard/a", b"first")
    pinned = store.get_pinned(b"shard/a")
    assert pinned is not None and bytes(pinned.view) == b"first" and pinned.pinned
    store.put(b"shard/a", b"second")  # a new version; the pinned snapshot keeps the old one
    assert bytes(pinned.view) == b"first"
    assert store.pinned_reads == 1
    pinned.release()
    pinned.release()  # idempotent
    assert store.pinned_reads == 0
    again = store.get_pinned(b"shard/a")
    assert again is not None and bytes(again.view) == b"second"
    del again  # dropping the last reference ends the read too
    assert store.pinned_reads == 0
    assert store.get_pinned(b"shard/none") is None
    shard = store.stats().namespaces["shard"]
    assert (shard.hits, shard.misses) == (2, 1)


def test_close_waits_for_pinned_reads(path: Path) -> None:
    store = CacheStore(path, 1 << 20)
    store.put(b"shard/a", b"value")
    pinned = store.get_pinned(b"shard/a")
    assert pinned is not None
    closing = threading.Thread(target=store.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive() and bytes(pinned.view) == b"value"  # still mapped
    pinned.release()
    closing.join(10)
    assert not closing.is_alive()


def test_corrupt_value_is_caught_by_a_pinned_read(path: Path) -> None:
    with CacheStore(path, 1 << 20) as store:
        store.put_many([(b"shard/bad", b"payload"), (b"shard/good", b"fine")])
        assert store.get_pinned(b"shard/bad") is not None  # verified, then remembered
    corrupt(path, b"shard/bad")

    with CacheStore(path, 1 << 20) as store:  # a new process verifies again
        assert store.get_pinned(b"shard/bad") is None
        good = store.get_pinned(b"shard/good")
        assert good is not None and bytes(good.view) == b"fine"
        good.release()
        shard = store.stats().namespaces["shard"]
        assert (shard.corrupt, shard.misses, shard.hits) == (1, 1, 1)
    assert raw_keys(path) == {b"shard/good"}


def test_corrupt_value_is_a_counted_miss_and_removed(path: Path) -> None:
    with CacheStore(path, 1 << 20) as store:
        store.put_many([(b"pred/m/bad", b"payload"), (b"pred/m/good", b"fine")])
    corrupt(path, b"pred/m/bad")

    with CacheStore(path, 1 << 20) as store:
        assert store.get_many([b"pred/m/bad", b"pred/m/good"]) == [None, b"fine"]
        pred = store.stats().namespaces["pred"]
        assert (pred.corrupt, pred.misses, pred.hits) == (1, 1, 1)
    # close() finished the queued removal: the bad value is gone from disk, the good one kept.
    assert raw_keys(path) == {b"pred/m/good"}


def test_ttl_expiry_is_a_miss_and_removed(path: Path) -> None:
    clock = Clock()
    with CacheStore(path, 1 << 20, clock=clock) as store:
        store.put(b"pred/m/short", b"v", ttl_seconds=10)
        store.put(b"pred/m/forever", b"w")
        clock.now += 5
        assert store.get(b"pred/m/short") == b"v"
        clock.now += 10
        assert store.contains_many([b"pred/m/short"]) == [False]
        assert store.get_many([b"pred/m/short", b"pred/m/forever"]) == [None, b"w"]
        assert store.stats().namespaces["pred"].expired == 1
    assert raw_keys(path) == {b"pred/m/forever"}


def test_eviction_keeps_the_budget_and_spares_recently_read_keys(path: Path) -> None:
    capacity = 64 * KiB
    with CacheStore(path, capacity) as store:
        store.put(b"pred/m/hot", b"h" * 100)
        for i in range(8):
            store.put(f"shard/d/{i}".encode(), os.urandom(4 * KiB))
        assert store.get(b"pred/m/hot") is not None  # read again: worth keeping
        # A sweep of shards far larger than the budget.
        for i in range(8, 64):
            store.put(f"shard/d/{i}".encode(), os.urandom(4 * KiB))
            assert store.stats().used_bytes <= capacity

        stats = store.stats()
        assert store.get(b"pred/m/hot") == b"h" * 100
        assert store.get(b"shard/d/0") is None  # the least recently used went first
        assert store.get(b"shard/d/63") is not None
        assert stats.namespaces["shard"].evictions > 0
        assert stats.namespaces["pred"].evictions == 0
        assert stats.used_bytes > capacity // 2


def test_value_larger_than_the_budget_is_resource_exhausted(path: Path) -> None:
    with CacheStore(path, 64 * KiB) as store:
        store.put(b"pred/m/kept", b"k" * KiB)
        with pytest.raises(ResourceExhausted, match="budget of 65536 bytes"):
            store.put(b"shard/d/huge", b"x" * (65 * KiB))
        with pytest.raises(ResourceExhausted, match="smaller batches"):
            store.put_many([(f"shard/d/{i}".encode(), b"x" * (40 * KiB)) for i in range(2)])
        assert store.get(b"pred/m/kept") == b"k" * KiB
        assert store.stats().namespaces["pred"].entries == 1
        assert (
            "shard" not in store.stats().namespaces or not store.stats().namespaces["shard"].entries
        )


def test_full_map_evicts_and_retries(path: Path) -> None:
    # A budget larger than the map: LMDB runs out of pages first and the store must evict.
    with CacheStore(path, 64 << 20, map_size=1 << 20) as store:
        for i in range(60):
            store.put(f"shard/d/{i}".encode(), os.urandom(64 * KiB))
        assert store.get(b"shard/d/59") is not None
        assert store.stats().namespaces["shard"].evictions > 0


def test_warm_restart_serves_old_entries(path: Path) -> None:
    with CacheStore(path, 1 << 20) as store:
        store.put_many([(f"pred/m/{i}".encode(), f"v{i}".encode()) for i in range(100)])
        used = store.stats().used_bytes
    with CacheStore(path, 1 << 20) as store:
        assert store.stats().used_bytes == used
        assert store.stats().namespaces["pred"].entries == 100
        assert store.get(b"pred/m/42") == b"v42"


def test_reopen_with_a_smaller_budget_evicts_down_to_it(path: Path) -> None:
    with CacheStore(path, 1 << 20) as store:
        store.put_many([(f"shard/d/{i}".encode(), b"x" * (8 * KiB)) for i in range(60)])
    with CacheStore(path, 128 * KiB) as store:
        assert store.stats().used_bytes <= 128 * KiB
        assert store.stats().namespaces["shard"].evictions > 0


def test_garbage_data_file_fails_fast_and_is_left_alone(path: Path) -> None:
    path.mkdir()
    garbage = os.urandom(64 * KiB)
    (path / "data.mdb").write_bytes(garbage)
    with pytest.raises(FailedPrecondition, match="not a valid LMDB file"):
        CacheStore(path, 1 << 20)
    assert (path / "data.mdb").read_bytes() == garbage
    with pytest.raises(FailedPrecondition, match="not a valid LMDB file"):
        CacheReader(path)


def test_concurrent_puts_from_threads_all_land(store: CacheStore) -> None:
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            for i in range(50):
                store.put(f"pred/w{worker}/{i}".encode(), f"{worker}:{i}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    keys = [f"pred/w{w}/{i}".encode() for w in range(8) for i in range(50)]
    assert store.get_many(keys) == [f"{w}:{i}".encode() for w in range(8) for i in range(50)]
    stats = store.stats()
    assert stats.namespaces["pred"].entries == 400
    assert stats.commits <= 400


def test_reader_in_the_same_process_shares_the_store_environment(store: CacheStore) -> None:
    with CacheReader(store.path) as reader:
        store.put(b"pred/m/a", b"seen")
        assert reader.get_many([b"pred/m/a", b"pred/m/b"]) == [b"seen", None]
    assert store.get(b"pred/m/a") == b"seen"  # closing the reader left the store working


_READER_SCRIPT = """
import json, sys
from pathlib import Path
from cache_service.store import CacheReader
with CacheReader(Path(sys.argv[1])) as reader:
    values = reader.get_many([k.encode() for k in sys.argv[2:]])
print(json.dumps([None if v is None else v.decode() for v in values]))
"""


def test_reader_in_another_process_sees_commits_and_treats_corrupt_as_miss(path: Path) -> None:
    with CacheStore(path, 1 << 20) as store:
        store.put(b"pred/m/bad", b"payload")
    corrupt(path, b"pred/m/bad")

    with CacheStore(path, 1 << 20) as store:
        store.put(b"pred/m/good", b"fresh")
        result = subprocess.run(
            [sys.executable, "-c", _READER_SCRIPT, str(path), "pred/m/good", "pred/m/bad", "x/y"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["fresh", None, None]
        # The reader never writes: the bad value is still there for the store to find.
        assert store.contains_many([b"pred/m/bad"]) == [True]
        assert store.get(b"pred/m/bad") is None
        assert store.stats().namespaces["pred"].corrupt == 1


def test_reader_without_a_store_checks_values_and_never_writes(path: Path) -> None:
    clock = Clock()
    with CacheStore(path, 1 << 20, clock=clock) as store:
        store.put_many([(b"pred/m/bad", b"p"), (b"pred/m/ok", b"q")])
        store.put(b"pred/m/ttl", b"r", ttl_seconds=5)
    corrupt(path, b"pred/m/bad")
    clock.now += 60
    with CacheReader(path, clock=clock) as reader:
        assert reader.get_many([b"pred/m/ok", b"pred/m/bad", b"pred/m/ttl"]) == [b"q", None, None]
    assert raw_keys(path) == {b"pred/m/ok", b"pred/m/bad", b"pred/m/ttl"}


def test_header_is_small(store: CacheStore) -> None:
    store.put(b"pred/m/a", b"12345")
    assert store.stats().used_bytes == len(b"pred/m/a") + HEADER.size + 5


_KILLED_WRITER_SCRIPT = """
import os, signal, sys
from pathlib import Path
from cache_service.store import CacheStore
store = CacheStore(Path(sys.argv[1]), 1 << 20)
store.put_many([(f"pred/m/{i}".encode(), b"v" * i) for i in range(100)])
store.get(b"pred/m/1")  # leaves a reader slot behind
os.kill(os.getpid(), signal.SIGKILL)  # no close(): acknowledged puts must survive
"""


def test_acknowledged_puts_survive_kill_9(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER_SCRIPT, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == -9, result.stderr
    with CacheStore(path, 1 << 20) as store:
        assert store.stats().namespaces["pred"].entries == 100
        assert store.get(b"pred/m/99") == b"v" * 99


def test_packed_batch_read_matches_get_many(store: CacheStore) -> None:
    store.put_many([(b"pred/m/a", b"alpha"), (b"pred/m/empty", b""), (b"pred/m/c", b"c" * 300)])
    keys = [b"pred/m/c", b"pred/m/none", b"pred/m/empty", b"pred/m/a"]
    packed = store.get_packed(keys)
    assert packed.found == [True, False, True, True]
    assert packed.sizes == [300, 0, 0, 5]
    assert packed.data == b"c" * 300 + b"alpha"
    assert packed.values() == store.get_many(keys) == [b"c" * 300, None, b"", b"alpha"]
    assert store.stats().namespaces["pred"].hits == 6

    with pytest.raises(InvalidArgument, match="packed values hold 4 bytes, their sizes say 3"):
        PackedValues([True], [3], b"abcd").values()
