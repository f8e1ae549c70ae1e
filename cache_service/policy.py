"""The cache's eviction policy, apart from LMDB so it can be tested and simulated alone
(`benchmarks/cache.py` replays traces through it next to plain LRU and Belady)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

# Share of the budget that entries read at least once since their write may hold.
PROTECTED_SHARE = 0.8


class SegmentedLru:
    """Segmented LRU over byte sizes: a written key enters probation, a read promotes it
    to the protected segment, victims come from probation first (oldest first). One pass
    over keys that are never read again (an epoch sweep of shards, a burst of one-off
    predictions) therefore only churns probation and cannot flush the keys that are read
    again. The protected segment is capped at `PROTECTED_SHARE` of the budget; keys it
    pushes out are demoted to the young end of probation, not dropped."""

    def __init__(self, capacity_bytes: int, protected_share: float = PROTECTED_SHARE):
        self.protected_capacity = int(capacity_bytes * protected_share)
        self.probation: OrderedDict[bytes, int] = OrderedDict()
        self.protected: OrderedDict[bytes, int] = OrderedDict()
        self.protected_bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.probation or key in self.protected

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

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

    def touch(self, key: bytes) -> bool:
        """A read of `key`; False when the policy does not know it."""
        if key in self.protected:
            self.protected.move_to_end(key)
            return True
        size = self.probation.pop(key, None)
        if size is None:
            return False
        self.protected[key] = size
        self.protected_bytes += size
        self._rebalance()
        return True

    def touch_many(self, keys: Iterable[bytes]) -> None:
        """`touch` for each key, in order (the read path's batch form)."""
        protected, probation, move = self.protected, self.probation, self.protected.move_to_end
        promoted = 0
        for key in keys:
            if key in protected:
                move(key)
                continue
            size = probation.pop(key, None)
            if size is not None:
                protected[key] = size
                self.protected_bytes += size
                promoted += 1
        if promoted:
            self._rebalance()

    def remove(self, key: bytes) -> None:
        size = self.protected.pop(key, None)
        if size is not None:
            self.protected_bytes -= size
        else:
            self.probation.pop(key, None)

    def victims(self, excess: int, skip: Iterable[bytes] = ()) -> list[bytes]:
        """Least valuable keys whose removal frees at least `excess` bytes, never one of
        `skip` (the keys being written). The caller removes them."""
        if excess <= 0:
            return []
        skip = set(skip)
        chosen: list[bytes] = []
        for segment in (self.probation, self.protected):
            for key, size in segment.items():
                if key in skip:
                    continue
                chosen.append(key)
                excess -= size
                if excess <= 0:
                    return chosen
        return chosen

    def _rebalance(self) -> None:
        while self.protected_bytes > self.protected_capacity and len(self.protected) > 1:
            key, size = self.protected.popitem(last=False)
            self.protected_bytes -= size
            self.probation[key] = size
