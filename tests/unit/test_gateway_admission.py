"""Admission control: a bounded number run, a bounded number wait in order, the rest are
refused at once with RESOURCE_EXHAUSTED (429)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission
from onehop.errors import ResourceExhausted

pytestmark = pytest.mark.timeout(10)


async def hold(admission: Admission, release: asyncio.Event, log: list[str], name: str) -> None:
    async with admission.slot():
        log.append(name)
        await release.wait()


async def test_limit_queue_and_fast_refusal() -> None:
    admission = Admission(limit=2, queue=1, queue_timeout=5)
    release = asyncio.Event()
    log: list[str] = []
    running = [asyncio.create_task(hold(admission, release, log, f"r{i}")) for i in range(2)]
    queued = asyncio.create_task(hold(admission, release, log, "q"))
    while admission.running < 2 or admission.waiting < 1:
        await asyncio.sleep(0)
    assert log == ["r0", "r1"]  # the third waits

    with pytest.raises(ResourceExhausted) as refused:
        async with admission.slot():
            pass
    assert refused.value.http_status == 429 and "capacity" in refused.value.message
    with pytest.raises(ResourceExhausted):
        admission.check()  # what an edge asks before parsing a request

    release.set()
    await asyncio.gather(*running, queued)
    assert log == ["r0", "r1", "q"]
    assert (admission.running, admission.waiting) == (0, 0)
    admission.check()  # room again


async def test_a_waiter_that_times_out_is_refused_and_leaves_the_queue() -> None:
    admission = Admission(limit=1, queue=4, queue_timeout=0.05)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, [], "holder"))
    while admission.running < 1:
        await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="queued"):
        async with admission.slot():
            pass
    assert admission.waiting == 0
    release.set()
    await holder
    async with admission.slot():  # the slot was given back
        assert admission.running == 1
    assert admission.running == 0


async def test_a_cancelled_waiter_frees_its_place() -> None:
    admission = Admission(limit=1, queue=1, queue_timeout=5)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, [], "holder"))
    while admission.running < 1:
        await asyncio.sleep(0)
    waiter = asyncio.create_task(hold(admission, release, [], "waiter"))
    while admission.waiting < 1:
        await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.waiting == 0
    release.set()
    await holder
    assert admission.running == 0


async def test_an_error_inside_the_slot_releases_it() -> None:
    admission = Admission(limit=1, queue=0, queue_timeout=1)
    with pytest.raises(ValueError):
        async with admission.slot():
            raise ValueError("boom")
    async with admission.slot():
        assert admission.running == 1
