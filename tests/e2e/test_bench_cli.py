"""`onehop bench --quick` through the CLI as CI runs it (the smoke test of the measured
report): the before/after module end to end on real meshes; the JSON's shape, the table, the
markdown section and the plots. Figures are printed, never asserted as timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FIELDS = {"name", "value", "baseline", "ratio", "goal", "unit", "conditions", "passed", "module"}
PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_bench_reports_before_and_after(tmp_path: Path):
    report_path, plots, page = tmp_path / "bench.json", tmp_path / "plots", tmp_path / "perf.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onehop",
            "bench",
            "--quick",
            "--only",
            "before_after",
            "--json",
            str(report_path),
            "--plots",
            str(plots),
            "--markdown",
            str(page),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(report_path.read_text())

    assert [(m["name"], m["status"]) for m in report["modules"]] == [("before_after", "ok")]
    figures = {f["name"]: f for f in report["figures"]}
    for figure in figures.values():
        assert FIELDS <= figure.keys()
        assert isinstance(figure["value"], float | int)
        assert isinstance(figure["baseline"], float | int)
    assert {
        "training time, repeat job",
        "inference p50, request mix",
        "prediction hit rate, request mix",
        "data access time, second full read",
        "bytes moved per 1,000 predictions",
        "CPU-seconds per 1,000 predictions",
    } <= figures.keys()
    # What the cache changes, as behaviour: the repeated mix hits, the second read is cached.
    assert figures["prediction hit rate, request mix"]["value"] > 0
    assert figures["prediction hit rate, request mix"]["baseline"] == 0
    assert figures["data hit rate, second full read"]["value"] == 100
    assert figures["data hit rate, second full read"]["baseline"] == 0
    # Every phase was accounted: the services used CPU and moved bytes.
    assert figures["CPU-seconds per 1,000 predictions"]["value"] > 0
    assert figures["bytes moved per 1,000 predictions"]["value"] > 0

    assert "training time, repeat job" in done.stdout
    assert "| figure | onehop | baseline | ratio | goal | result |" in page.read_text()
    written = sorted(p.name for p in plots.iterdir())
    assert written == ["hit_rate.png", "latency.png", "throughput.png", "training.png"]
    assert all((plots / name).read_bytes().startswith(PNG) for name in written)
