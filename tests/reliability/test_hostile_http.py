"""schemathesis over the live mesh's HTTP API (the gateway's OpenAPI): every documented route
with generated valid and invalid input, answered by the real inner services behind it —
never a 5xx, and the mesh stays up. Full runs only (`make reliability`); the gateway's own
service tests run a short schemathesis pass in CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import FULL, MeshUnderTest, Report, Workloads

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(900)]


def test_schemathesis_over_the_whole_mesh(
    mesh: MeshUnderTest, workloads: Workloads, report: Report, tmp_path: Path
) -> None:
    pids = mesh.all_pids()
    schemathesis = Path(sys.executable).with_name("schemathesis")
    if not schemathesis.exists():
        pytest.skip("schemathesis is not installed (the dev extra has it)")
    result = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"http://{mesh.endpoint('gateway', 'http')}/openapi.json",
            "--checks=not_a_server_error",
            f"--max-examples={100 if FULL else 15}",
            "--seed=8",
            "--phases=examples,coverage,fuzzing",
            "--request-timeout=30",
            # A started job would train for real (hours, for some generated inputs).
            "--exclude-name=POST /v1/jobs",
            "--include-path-regex=^/v[12]",
        ],
        env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # its own cache directory stays out of the checkout
        capture_output=True,
        text=True,
        timeout=800,
    )
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", result.stdout)) or 1
    report.bad_input("schemathesis HTTP cases", cases)
    assert result.returncode == 0, result.stdout[-4000:]
    assert mesh.all_pids() == pids
    mesh.wait_healthy(timeout=10)
