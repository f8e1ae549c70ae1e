"""Soak: bounded mixed load (predictions, shard reads, ingests, cache Puts, training) for a
set duration with a fault every few seconds (kill -9 or pause, each service in turn); the
RSS of every service is sampled throughout. Zero acknowledged writes lost, every call within
its deadline, and memory stays flat (the growth is reported; a bound catches a leak)."""

from __future__ import annotations

import itertools
import os
import time

import pytest
from harness import (
    FULL,
    Faults,
    Load,
    MeshUnderTest,
    Report,
    RssSampler,
    Workloads,
    assert_calls_behaved,
    start_load,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]

SECONDS = float(os.environ.get("ONEHOP_SOAK_SECONDS", 300 if FULL else 25))
FAULT_EVERY = 10.0 if FULL else 8.0
# A leak shows as steady growth; a one-off allocation (a new model loaded, an LMDB map
# touched) stays well under this over a soak of minutes.
MAX_GROWTH_MIB = 128.0
PLAN = [("kill", "cache"), ("pause", "cache"), ("pause", "trainer"), ("kill", "shard"),
        ("kill", "trainer"), ("kill", "gateway")]  # fmt: skip


def test_soak_with_periodic_faults(
    mesh: MeshUnderTest,
    workloads: Workloads,
    faults: Faults,
    load: Load,
    report: Report,
    recovered,  # type: ignore[no-untyped-def]
) -> None:
    with RssSampler(mesh) as rss:
        kinds = start_load(load, workloads)
        load.wait_ok(kinds, load.mark())
        ends = time.monotonic() + SECONDS
        for kind, service in itertools.cycle(PLAN):
            if time.monotonic() >= ends:
                break
            if kind == "kill":
                mesh.wait_restarted(service, faults.kill(service))
            else:
                with faults.paused(service):
                    paused = time.monotonic()
                    load.wait(
                        lambda p=paused: len(load.window("predict", p, time.monotonic())) >= 4,
                        timeout=60,
                        what="predictions during a pause",
                    )
            mesh.wait_healthy()
            load.wait_ok(["predict", "read"], load.mark())
            # The next fault comes FAULT_EVERY seconds on, while the load goes on.
            calm_until = min(ends, time.monotonic() + FAULT_EVERY)
            load.wait(
                lambda until=calm_until: time.monotonic() >= until,
                timeout=FAULT_EVERY + 5,
                what="the next fault",
            )
        load.wait_ok(kinds, load.mark())
        load.stop()
    growth = rss.growth()
    report.record_rss(growth)
    assert_calls_behaved(load)
    recovered()
    for service, figures in growth.items():
        assert figures["growth_mib"] < MAX_GROWTH_MIB, (service, growth)
