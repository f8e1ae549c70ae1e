"""Prebuilt answers to repeated identical requests, in front of the row cache.

A prediction is a pure function of the weights and the row, and the weights digest names
the weights: so a request whose exact bytes were answered before, from a full cache hit,
under the same resolved digest, gets the same encoded answer again — without parsing,
hashing, reading LMDB or encoding (DESIGN §2's hit path, at its cheapest). Bounded in
bytes, least recently used out first; a new model version means a new digest, so nothing
needs flushing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
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
