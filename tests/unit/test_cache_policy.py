"""The eviction policy alone, and through the store: one epoch sweep of shard keys must not
flush the prediction keys that are read again (DESIGN §3)."""

from __future__ import annotations

import os
from pathlib import Path

from cache_service.policy import SegmentedLru
from cache_service.store import CacheStore

KiB = 1 << 10


def test_victims_come_from_probation_first_and_skip_the_keys_being_written() -> None:
    policy = SegmentedLru(1000)
    for key in (b"a", b"b", b"c"):
        policy.add(key, 100)
    assert policy.touch(b"a") and not policy.touch(b"nope")
    assert policy.victims(150) == [b"b", b"c"]
    assert policy.victims(150, skip=[b"b"]) == [b"c", b"a"]
    assert policy.victims(0) == []
    policy.remove(b"b")
    assert b"b" not in policy and len(policy) == 2


def test_protected_segment_is_capped_and_demotes_to_probation() -> None:
    policy = SegmentedLru(1000, protected_share=0.5)
    for i in range(8):
        policy.add(bytes([i]), 100)
    policy.touch_many([bytes([i]) for i in range(8)])
    assert policy.protected_bytes <= 500
    assert list(policy.protected) == [bytes([i]) for i in range(3, 8)]
    # Demoted, not dropped: the oldest protected keys are the youngest of probation.
    assert list(policy.probation) == [bytes([i]) for i in range(3)]


def test_one_sweep_of_shards_does_not_flush_hot_prediction_keys() -> None:
    budget = 100 * KiB
    policy = SegmentedLru(budget)
    hot = [f"pred/m/{i}".encode() for i in range(50)]
    used = 0
    sizes: dict[bytes, int] = {}

    def write(key: bytes, size: int) -> None:
        nonlocal used
        policy.add(key, size)
        sizes[key] = size
        used += size
        for victim in policy.victims(used - budget, skip=[key]):
            policy.remove(victim)
            used -= sizes.pop(victim)

    for key in hot:
        write(key, KiB)
    policy.touch_many(hot)  # read again: worth keeping
    for i in range(200):  # an epoch: 800 KiB of shards through a 100 KiB budget
        write(f"shard/d/{i}".encode(), 4 * KiB)
    assert all(key in policy for key in hot)
    assert used <= budget


def test_store_keeps_hot_prediction_keys_through_an_epoch_sweep(tmp_path: Path) -> None:
    budget = 256 * KiB
    with CacheStore(tmp_path / "cache", budget) as store:
        hot = [f"pred/m/{i}".encode() for i in range(64)]
        store.put_many([(key, os.urandom(KiB)) for key in hot])
        assert None not in store.get_many(hot)
        for _epoch in range(2):  # 2 MiB of shards per epoch, read through as the data path does
            for i in range(128):
                key = f"shard/d/{i}".encode()
                assert store.get(key) is None  # the sweep is larger than the cache
                store.put(key, os.urandom(16 * KiB))
                assert store.stats().used_bytes <= budget

        assert None not in store.get_many(hot)
        stats = store.stats()
        assert stats.namespaces["pred"].evictions == 0
        assert stats.namespaces["shard"].evictions > 100
