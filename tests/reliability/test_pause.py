"""Pause (SIGSTOP / SIGCONT) of the cache and of the trainer under load: every call keeps
its deadline; predictions bypass a frozen cache and hits survive a frozen trainer; after
SIGCONT every kind of work succeeds again and nothing acknowledged is lost."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from harness import FAULT_CODES, Clients, Faults, Load, MeshUnderTest, Workloads

from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

PREDICT_DEADLINE = 3.0


def calls_in_pause(load: Load, kinds: list[str], started: float, calls: int = 3) -> float:
    """Wait (bounded) until each kind finished `calls` calls that started while paused;
    returns when the pause may end."""
    load.wait(
        lambda: all(len(load.window(kind, started, time.monotonic())) >= calls for kind in kinds),
        timeout=60,
        what=f"{calls} calls of each of {kinds} during the pause",
    )
    return time.monotonic()


def test_frozen_cache_is_bypassed(
    workloads: Workloads,
    faults: Faults,
    load: Load,
    recovered,  # type: ignore[no-untyped-def]
) -> None:
    workloads.warm_pool()
    load.start("predict_hit", workloads.predict_hit, PREDICT_DEADLINE)
    load.start("predict_miss", workloads.predict_miss, PREDICT_DEADLINE)
    load.start("read", workloads.read, 10.0, pace=0.2)
    # Puts wait out the pause (their deadline is longer): they finish once it ends. Puts
    # that expire inside a frozen cache are the scenario below.
    load.start("cache_put", workloads.cache_put, 60.0)
    kinds = ["predict_hit", "predict_miss", "read"]
    load.wait_ok([*kinds, "cache_put"], load.mark())

    with faults.paused("cache"):
        paused = time.monotonic()
        resumed = calls_in_pause(load, kinds, paused)
    load.wait_ok([*kinds, "cache_put"], time.monotonic())
    load.stop()

    assert not load.overruns(), load.summary()
    assert not load.unexpected({}), load.summary()
    # The gateway reads hits from the memory map and treats a slow cache as a miss.
    for kind in ("predict_hit", "predict_miss"):
        during = load.window(kind, paused, resumed)
        assert {c.code for c in during} == {"OK"}, f"{kind} during the pause: {during}"
    puts = load.window("cache_put", paused, resumed)
    assert all(c.code in FAULT_CODES for c in puts), puts
    recovered()


def test_frozen_trainer_keeps_deadlines(
    workloads: Workloads,
    faults: Faults,
    load: Load,
    recovered,  # type: ignore[no-untyped-def]
) -> None:
    workloads.warm_pool()
    load.start("predict_hit", workloads.predict_hit, PREDICT_DEADLINE)
    load.start("predict_miss", workloads.predict_miss, PREDICT_DEADLINE)
    load.start("read", workloads.read, 10.0, pace=0.2)
    kinds = ["predict_hit", "predict_miss", "read"]
    load.wait_ok(kinds, load.mark())

    with faults.paused("trainer"):
        paused = time.monotonic()
        resumed = calls_in_pause(load, kinds, paused)
    load.wait_ok(kinds, time.monotonic())
    load.stop()

    assert not load.overruns(), load.summary()
    assert not load.unexpected({}), load.summary()
    # Misses that ended while the trainer was still stopped (not those SIGCONT released).
    misses = [
        c for c in load.window("predict_miss", paused, resumed) if c.started + c.seconds < resumed
    ]
    assert misses, load.summary()
    assert {c.code for c in misses} <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, misses
    recovered()


def test_frozen_trainer_still_serves_cached_predictions(
    mesh,
    workloads: Workloads,
    faults: Faults,
    load: Load,  # type: ignore[no-untyped-def]
) -> None:
    workloads.warm_pool()
    load.start("predict_hit", workloads.predict_hit, PREDICT_DEADLINE)
    load.wait_ok(["predict_hit"], load.mark())
    with faults.paused("trainer"):
        paused = time.monotonic()
        late = paused + 2 * Settings().model_info_ttl_seconds  # past the gateway's TTL
        load.wait(
            lambda: len(load.window("predict_hit", late, time.monotonic())) >= 3,
            timeout=60,
            what="cached predictions after the model-info TTL",
        )
        during = load.window("predict_hit", paused, time.monotonic())
    load.stop()
    mesh.wait_healthy()
    assert {c.code for c in during} == {"OK"}, f"cached predictions during the pause: {during}"


def test_puts_expiring_in_a_frozen_cache_leave_it_writable(
    mesh: MeshUnderTest, clients: Clients, workloads: Workloads, faults: Faults
) -> None:
    def put(deadline: float) -> None:
        key = f"frozen/{uuid.uuid4().hex}".encode()
        clients.cache.Put(
            cache_pb2.PutRequest(key=key, value=os.urandom(64 << 10)), timeout=deadline
        )

    try:
        for _ in range(3):  # Puts queued at the writer when the cache stops, expiring meanwhile
            cycle = Load()
            for _ in range(8):
                cycle.start("frozen_put", put, 1.0, pace=0.0)
            cycle.wait_ok(["frozen_put"], cycle.mark(), timeout=30)
            with faults.paused("cache"):
                paused = time.monotonic()
                cycle.wait(
                    lambda c=cycle, p=paused: len(c.window("frozen_put", p, time.monotonic())) >= 8,
                    timeout=30,
                    what="Puts expiring in the pause",
                )
            cycle.stop()
            put(10.0)  # the cache takes writes again
    finally:  # a wedged writer would fail every later scenario: restart the cache
        faults.kill_and_wait("cache")
        mesh.wait_healthy()
