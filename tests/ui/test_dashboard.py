"""The dashboard at /ui in headless Chromium (Debian's `chromium`): a real mesh with a trained
model and a few predictions; the page must render the health table, the model, the dataset,
the job and the request rows from the gateway's JSON and /metrics. A screenshot is kept in
artifacts/ (or $ONEHOP_ARTIFACTS) for CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from onehop.client import GatewayClient
from onehop.dataset import TARGET, credit_default
from onehop.launcher import Mesh
from onehop.settings import Settings
from onehop.training_view import job_request
from protos.onehop.v1 import trainer_pb2

CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None
)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)"
    ),
]

ARTIFACTS = Path(os.environ.get("ONEHOP_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))
DATASET, MODEL = "credit-default", "default-risk"
ENDED = (
    trainer_pb2.JOB_STATE_SUCCEEDED,
    trainer_pb2.JOB_STATE_FAILED,
    trainer_pb2.JOB_STATE_CANCELLED,
)
# Virtual time Chromium lets the page run (it waits on network fetches meanwhile): enough
# for several polls of the dashboard.
BUDGET_MS = "8000"


@pytest.fixture(scope="module")
def gateway_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A mesh as processes with one dataset, one trained model and a miss then a hit."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("mesh"),
        gateway_http_port=0,
        gateway_grpc_port=0,
        gateway_flight_port=0,
        grace_seconds=0.5,
        cache_size_bytes=64 << 20,
    )
    mesh = Mesh(settings, say=lambda line: None)
    mesh.start()
    try:
        table = credit_default(2000)
        with GatewayClient(settings, timeout=60) as client:
            client.ingest(
                pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), DATASET
            )
            job_id = client.start_job(
                job_request(dataset=DATASET, target=TARGET, model=MODEL, epochs=2, batch_size=256)
            )
            last = None
            for last in client.watch_job(job_id):
                if last.state in ENDED:
                    break
            assert last is not None and last.state == trainer_pb2.JOB_STATE_SUCCEEDED, last
            features = [c for c in table.column_names if c != TARGET]
            rows = np.column_stack([table[f].to_numpy() for f in features])[:4].astype(np.float32)
            # A miss, then the same rows until their write-back has landed and they hit.
            outcomes = [client.predict(MODEL, rows).cache]
            while outcomes[-1] != "hit" and len(outcomes) < 100:
                time.sleep(0.02)
                outcomes.append(client.predict(MODEL, rows).cache)
            assert outcomes[0] == "miss" and outcomes[-1] == "hit", outcomes
        yield mesh.children["gateway"].endpoints["http"]
    finally:
        mesh.stop()


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            # CI runs as root in a container: no sandbox there, no GPU, small /dev/shm.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--virtual-time-budget={BUDGET_MS}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


class Rows(HTMLParser):
    """Each table row's data-* attributes and cell texts, by table id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[dict[str, str], list[str]]]] = {}
        self._table = ""
        self._cells: list[str] | None = None
        self._in_cell = False
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = attributes
        elif tag == "table":
            self._table = attributes.get("id", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr":
            data = {
                k.removeprefix("data-"): v for k, v in attributes.items() if k.startswith("data-")
            }
            self._cells = []
            self.tables[self._table].append((data, self._cells))
        elif tag in ("td", "th") and self._cells is not None:
            self._cells.append("")
            self._in_cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False
        elif tag == "tr":
            self._cells = None

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._cells:
            self._cells[-1] += data.strip()

    def rows(self, table: str, key: str) -> dict[str, list[str]]:
        return {data[key]: cells for data, cells in self.tables.get(table, []) if key in data}


def test_dashboard_renders_the_mesh(gateway_http: str, tmp_path: Path):
    url = f"http://{gateway_http}/ui/"
    page = Rows()
    page.feed(chromium(tmp_path, "--dump-dom", url).stdout)

    assert int(page.body.get("data-polled", "0")) >= 1, "the dashboard never finished a poll"
    health = page.rows("health", "service")
    assert set(health) == {"gateway", "cache", "shard", "trainer"}
    assert all(cells[-1] == "SERVING" for cells in health.values()), health
    models = page.rows("models", "model")
    assert models[MODEL][1] == "1"  # the serving version
    datasets = page.rows("datasets", "dataset")
    assert datasets[DATASET][2] == "2,000"
    jobs = page.rows("jobs", "job")
    assert [cells[3] for cells in jobs.values()] == ["SUCCEEDED"]
    requests = page.rows("requests", "outcome")
    assert int(requests["miss"][1]) >= 1 and requests["hit"][1] == "1"
    planes = page.rows("planes", "plane")
    hit_rate = planes["predictions (gateway)"][1]
    assert hit_rate.endswith(" %") and 0 < float(hit_rate.removesuffix(" %")) < 100, planes

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui.png"
    shot.unlink(missing_ok=True)
    chromium(tmp_path, "--window-size=1280,1100", "--hide-scrollbars", f"--screenshot={shot}", url)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
