"""The response memo: least recently used out first, bounded in bytes."""

from __future__ import annotations

from gateway.memo import Answer, ResponseMemo


def answer(size: int) -> Answer:
    return Answer(body=b"x" * size, rows=1, size=size)


def test_bounded_in_bytes_least_recently_used_out_first() -> None:
    memo = ResponseMemo(max_bytes=100)
    memo.put("a", answer(40))
    memo.put("b", answer(40))
    assert memo.get("a") is not None  # a is now the most recent
    memo.put("c", answer(40))  # over 100: b goes
    assert memo.get("b") is None
    assert memo.get("a") is not None and memo.get("c") is not None
    assert memo.size == 80 and len(memo) == 2


def test_replacing_and_oversized_answers() -> None:
    memo = ResponseMemo(max_bytes=100)
    memo.put("a", answer(40))
    memo.put("a", answer(60))
    assert memo.size == 60 and len(memo) == 1
    memo.put("huge", answer(101))  # never kept, evicts nothing
    assert memo.get("huge") is None and memo.get("a") is not None
    off = ResponseMemo(max_bytes=0)
    off.put("a", answer(1))
    assert len(off) == 0
