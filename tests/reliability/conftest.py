"""Fixtures of the reliability suite: one seeded mesh of real processes shared by the fault
and hostile-input scenarios, its outside clients, the ledger of acknowledged writes, load
and fault injectors per scenario — and the hooks that turn the run into the report
(`artifacts/reliability.json` and the table printed at the end)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    FULL,
    REPORT,
    Clients,
    Faults,
    Ledger,
    Load,
    MeshUnderTest,
    Report,
    Workloads,
    check_whole,
    seed,
    write_report,
)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The full-only scenarios (marked `slow`) run under `make reliability`
    (ONEHOP_RELIABILITY=full), never in the default run."""
    if FULL:
        return
    dropped = [
        item
        for item in items
        if HERE in Path(str(item.path)).parents and item.get_closest_marker("slow")
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
            REPORT.finding(report.nodeid.split("::", 1)[-1], report.wasxfail, "xfail")
        REPORT.scenarios.append(
            {"scenario": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 2)}
        )


def _report_path(config: pytest.Config) -> Path:
    path = os.environ.get("ONEHOP_RELIABILITY_REPORT", "artifacts/reliability.json")
    return Path(config.rootpath) / path


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT.scenarios:
        write_report(REPORT, _report_path(session.config))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT.scenarios:
        terminalreporter.section("reliability")
        terminalreporter.write_line(REPORT.table())
        terminalreporter.write_line(f"written to {_report_path(terminalreporter.config)}")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshUnderTest]:
    """The shared mesh, started by the launcher as `onehop up` does, supervised."""
    under_test = MeshUnderTest(tmp_path_factory.mktemp("reliability") / "data")
    try:
        yield under_test.start()
    finally:
        under_test.stop()


@pytest.fixture(scope="session")
def clients(mesh: MeshUnderTest) -> Iterator[Clients]:
    outside = Clients(mesh)
    try:
        yield outside
    finally:
        outside.close()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    """Acknowledged writes of the whole session: each scenario checks all of them."""
    return Ledger()


@pytest.fixture(scope="session")
def workloads(clients: Clients, ledger: Ledger) -> Workloads:
    """The credit dataset ingested and a model trained on it; the load's operations."""
    features = seed(clients, ledger)
    return Workloads(clients, ledger, features)


@pytest.fixture
def faults(mesh: MeshUnderTest) -> Iterator[Faults]:
    injector = Faults(mesh)
    try:
        yield injector
    finally:
        injector.release()


@pytest.fixture
def load() -> Iterator[Load]:
    running = Load()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def recovered(mesh: MeshUnderTest, clients: Clients, ledger: Ledger):  # type: ignore[no-untyped-def]
    """`recovered()`: the mesh is healthy again, no acknowledged write is lost and every
    listed dataset version and model is whole."""

    def check() -> None:
        mesh.wait_healthy()
        lost = ledger.verify(clients)
        assert lost == [], f"acknowledged writes lost: {lost}"
        broken = check_whole(clients)
        assert broken == [], f"corrupt state after recovery: {broken}"

    return check
