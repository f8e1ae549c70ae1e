"""Admission control for the predict path: a bounded number of requests run at once, a
bounded number wait, and the rest are refused at once so that admitted requests keep their
latency under overload (DESIGN §7: RESOURCE_EXHAUSTED / 429 with Retry-After)."""

from __future__ import annotations

import asyncio
from collections import deque

from prometheus_client import Counter, Gauge

from onehop.errors import ResourceExhausted

ADMISSIONS = Counter(
    "onehop_gateway_admissions",
    "Predict requests by admission result (admitted, queued, rejected, timed_out).",
    ["result"],
)
IN_FLIGHT = Gauge("onehop_gateway_in_flight", "Predict requests running now (the newest router's).")
_ADMITTED = ADMISSIONS.labels("admitted")


class Admission:
    """`async with admission.slot():` runs the body once one of `limit` slots is free.

    Up to `queue` callers wait in FIFO order, each at most `queue_timeout` seconds; a caller
    beyond the queue, or one that waited too long, gets ResourceExhausted without delay.
    """

    def __init__(self, limit: int, queue: int, queue_timeout: float):
        self.limit = limit
        self.queue = queue
        self.queue_timeout = queue_timeout
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Read when scraped: nothing to update per request.
        IN_FLIGHT.set_function(lambda: self.running)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def slot(self, timeout: float | None = None) -> _Slot:
        """`async with`: a slot for the body; a queued caller waits at most `queue_timeout`,
        and never longer than its own `timeout`."""
        return _Slot(self, timeout)

    def check(self) -> None:
        """Refuse at once when neither a slot nor a place in the queue is free, so that an
        edge turns a request away before spending anything on parsing it."""
        if self.running >= self.limit and len(self._waiters) >= self.queue:
            ADMISSIONS.labels("rejected").inc()
            raise self._full()

    def _full(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"the gateway is at capacity ({self.limit} running, {self.queue} waiting); "
            "retry after the Retry-After interval"
        )

    async def acquire(self, timeout: float | None = None) -> None:
        if self.running < self.limit and not self._waiters:
            self.running += 1
            _ADMITTED.inc()
            return
        wait = self.queue_timeout if timeout is None else min(timeout, self.queue_timeout)
        await self._wait(wait)

    async def _wait(self, wait: float) -> None:
        if len(self._waiters) >= self.queue:
            ADMISSIONS.labels("rejected").inc()
            raise self._full()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), wait)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we gave up: pass it on.
                self.release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            ADMISSIONS.labels("timed_out").inc()
            raise ResourceExhausted(
                f"the gateway is at capacity: queued {wait:g}s without a slot; "
                "retry after the Retry-After interval"
            ) from None
        ADMISSIONS.labels("queued").inc()

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return  # `running` is unchanged: the slot moved
        self.running -= 1


class _Slot:
    """What `Admission.slot()` returns: acquire on entry, release on exit."""

    __slots__ = ("_admission", "_timeout")

    def __init__(self, admission: Admission, timeout: float | None):
        self._admission = admission
        self._timeout = timeout

    async def __aenter__(self) -> None:
        await self._admission.acquire(self._timeout)

    async def __aexit__(self, *exc: object) -> None:
        self._admission.release()
