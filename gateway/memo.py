"""Prebuilt answers to repeated identical requests, in front of the row cache.

A prediction is a pure function of the weights and the row, and the weights digest names
the weights: so a request whose exact bytes were answered before, from a full cache hit,
under the same resolved digest, gets the same encoded answer again — without parsing,
hashing, reading LMDB or encoding (DESIGN §2's hit path, at its cheapest). Bounded in
bytes, least recently used out first. Keys carry the (version, digest) that
InferenceRouter.resolved() gave, stale info included: once a refresh names other weights no
request builds the old key again, so nothing needs flushing and no old answer is served.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

# Requests larger than this are not kept: repeats of big batches are rare, and their
# answers would crowd out many small ones.
MAX_REQUEST_BYTES = 16 << 10


@dataclass(frozen=True)
class Answer:
    """One prebuilt answer: what the edge sends, and the rows it covers (for metrics)."""

    body: Any  # HTTP: (content bytes, headers); gRPC: the response message
    rows: int
    size: int  # bytes it holds, request key included


class ResponseMemo:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self._answers: OrderedDict[Hashable, Answer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: Hashable) -> Answer | None:
        answer = self._answers.get(key)
        if answer is not None:
            self._answers.move_to_end(key)
        return answer

    def put(self, key: Hashable, answer: Answer) -> None:
        if answer.size > self.max_bytes:
            return
        old = self._answers.pop(key, None)
        if old is not None:
            self.size -= old.size
        self._answers[key] = answer
        self.size += answer.size
        while self.size > self.max_bytes:
            _, evicted = self._answers.popitem(last=False)
            self.size -= evicted.size

    def keep_if_hit(
        self, key: Hashable | None, weights: object, result: Any, build: Callable[[], Answer]
    ) -> None:
        """Keep `build()` under `key` when `result` (an InferResult) was a full hit under the
        (version, digest) the key was made for: only then is it the answer to those bytes."""
        if (
            key is not None
            and result.cache == "hit"
            and weights == (result.model_version, result.digest)
        ):
            self.put(key, build())
