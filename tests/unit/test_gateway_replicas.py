"""The client-side pieces of the degraded modes: retry throttling and replica addresses
(the failover itself runs against real trainer processes in the service tests)."""

from __future__ import annotations

from onehop.channels import RetryThrottle, split_addresses


def test_retry_throttling_stops_retries_while_most_calls_fail() -> None:
    throttle = RetryThrottle(max_tokens=10, ratio=0.1)
    assert throttle.allows_retry()
    for _ in range(6):
        throttle.failed()
    assert not throttle.allows_retry()  # over half the tokens gone: retries stop
    for _ in range(9):
        throttle.succeeded()
    assert not throttle.allows_retry()  # 0.1 a success: recovery is slow on purpose
    for _ in range(2):
        throttle.succeeded()
    assert throttle.allows_retry()
    for _ in range(1000):
        throttle.succeeded()
    assert throttle.tokens == 10


def test_replica_addresses() -> None:
    assert split_addresses("a:1, b:2,,c:3 ") == ["a:1", "b:2", "c:3"]
    assert split_addresses("dns:///trainer-headless:8001") == ["dns:///trainer-headless:8001"]
    assert split_addresses("") == []
