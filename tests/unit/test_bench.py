"""The bench runner: each module in a child process, a failing, hanging or missing module as
one failed row while the others still report, and the report's JSON, table and markdown;
and the launcher's one-service restart that the before/after module measures with."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from onehop import bench
from onehop.benchmark import BenchContext, Figure, format_table
from onehop.launcher import SERVICES, Mesh, health_status
from onehop.settings import Settings

pytestmark = pytest.mark.timeout(120)

GOOD = """
from onehop.benchmark import Figure


def run(ctx):
    ctx.record("latency_ms/hit", [1.0, 2.0])
    (ctx.workdir / "scratch").write_text("mine")
    return [
        Figure("throughput", 900.0, "req/s", 1000.0, "plain", goal="ratio >= 0.9",
               conditions={"quick": ctx.quick}),
        Figure("nan value", float("nan"), "ms"),
    ]
"""
BROKEN = """
def run(ctx):
    raise ValueError("the broken module broke")
"""
HANGS = """
import time


def run(ctx):
    time.sleep(600)
"""


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout whose benchmarks/ holds a good, a broken and a hanging module."""
    root = tmp_path / "checkout"
    package = root / "benchmarks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, source in (("good", GOOD), ("broken", BROKEN), ("hangs", HANGS)):
        (package / f"{name}.py").write_text(source)
    monkeypatch.setattr(bench, "ROOT", root)
    monkeypatch.setattr(bench, "BENCHMARKS", package)
    return root


def test_a_failing_or_missing_module_is_a_failed_row_and_the_rest_still_report(checkout: Path):
    report = bench.run_all(["broken", "good", "absent"], quick=True, say=lambda line: None)

    assert [m["status"] for m in report["modules"]] == ["failed", "ok", "missing"]
    rows = {row["name"]: row for row in report["figures"]}
    assert rows["broken"]["passed"] is False
    assert rows["broken"]["error"] == "ValueError: the broken module broke"
    assert "does not exist" in rows["absent"]["error"]

    good = rows["throughput"]
    assert good["module"] == "good"
    assert good["ratio"] == pytest.approx(0.9)
    assert good["passed"] is True
    assert good["conditions"] == {"quick": True}
    # NaN is not JSON: the report says null.
    assert rows["nan value"]["value"] is None
    assert report["samples"] == {"good": {"latency_ms/hit": [1.0, 2.0]}}
    json.loads(json.dumps(report, allow_nan=False))
    assert {"cpus", "cpu_model", "torch", "date"} <= report["machine"].keys()


def test_a_module_past_its_timeout_is_stopped_and_reported(checkout: Path, tmp_path: Path):
    result = bench.run_module("hangs", tmp_path / "run", quick=True, target="", timeout=3)

    assert result.status == "failed"
    assert result.error == "timed out after 3 s"


def test_table_and_markdown_show_every_figure_and_the_machine():
    figures = [
        {"module": "m", **Figure("hit p50", 0.8, "ms", 0.5, "bare", goal="ratio <= 1.5").to_json()},
        {"module": "m", **Figure("rows", 1234567.0, "rows/s").to_json()},
        bench.ModuleResult("gone", "missing", error="benchmarks/gone.py does not exist").rows()[0],
    ]
    text = format_table(figures)
    assert "hit p50" in text and "0.8 ms" in text and "0.5 ms (bare)" in text
    assert "1.60×" in text and "FAIL" in text
    assert "1,234,567 rows/s" in text
    assert "gone: benchmarks/gone.py does not exist" in text

    report = {
        "command": "onehop bench --quick",
        "machine": {
            "cpus": 2,
            "cpu_model": "Test CPU",
            "memory_gib": 4.0,
            "gpu": "",
            "torch": "2.x",
            "python": "3.11",
            "os": "Linux",
            "onehop": "0.1.0",
            "commit": "abc1234",
            "date": "2026-01-01 00:00 UTC",
        },
        "figures": figures,
    }
    page = bench.markdown(report, [Path("/docs/plots/latency.png")], base=Path("/docs"))
    assert "`onehop bench --quick` on 2 CPUs (Test CPU)" in page
    assert "torch 2.x" in page
    assert "| hit p50 | 0.8 ms | 0.5 ms (bare) | 1.60× | ratio <= 1.5 | FAIL |" in page
    assert "![latency](plots/latency.png)" in page


@pytest.mark.timeout(60)
def test_a_restarted_service_keeps_its_ports_and_gets_extra_env_for_that_start_only(
    tmp_path: Path,
):
    """What before/after relies on to measure batching off: one service restarted with a
    knob, on its old ports, while the rest of the mesh keeps running."""
    cache = next(spec for spec in SERVICES if spec.name == "cache")
    quiet = {"ONEHOP_LOG_LEVEL": "WARNING"}
    mesh = Mesh(
        Settings(data_dir=tmp_path / "mesh"), say=lambda line: None, services=(cache,), env=quiet
    )
    endpoints = mesh.start()["cache"]
    old = mesh.children["cache"].process
    try:
        mesh.restart("cache", {"ONEHOP_CACHE_SIZE_BYTES": str(64 << 20)})
        child = mesh.children["cache"]
        assert old.poll() is not None
        assert child.process.pid != old.pid
        assert child.endpoints == endpoints
        assert health_status(child.endpoints["grpc"]) == "SERVING"
        assert psutil.Process(child.process.pid).environ()["ONEHOP_CACHE_SIZE_BYTES"] == str(
            64 << 20
        )
        assert mesh.extra_env == quiet
    finally:
        mesh.stop()
    assert mesh.children["cache"].process.poll() is not None


def test_samples_are_thinned_evenly_for_the_report(tmp_path: Path) -> None:
    ctx = BenchContext(tmp_path)
    ctx.record("lookups", [float(i) for i in range(12_345)])
    ctx.record("few", [1.0, 2.0])
    thinned = ctx.thinned(most=5000)
    assert len(thinned["lookups"]) <= 5000
    # An even stride keeps the order and both ends of the range.
    assert thinned["lookups"] == sorted(thinned["lookups"])
    assert thinned["lookups"][0] == 0.0 and thinned["lookups"][-1] > 12_000
    assert thinned["few"] == [1.0, 2.0]
