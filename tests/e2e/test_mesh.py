"""End to end: `onehop up` as real processes; ingest, train and predict through the CLI,
the HTTP bridge, gRPC and tritonclient; kill -9 a service and see the launcher restore it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from onehop.dataset import TARGET, credit_default, write_csv
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = "risk"


class Up:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        env = {
            **os.environ,
            "ONEHOP_GATEWAY_HTTP_PORT": "0",
            "ONEHOP_GATEWAY_GRPC_PORT": "0",
            "ONEHOP_GATEWAY_FLIGHT_PORT": "0",
            "ONEHOP_GRACE_SECONDS": "1",
        }
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "onehop", "up", "--data-dir", str(data_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("ready"):
                self._ready.set()

    def wait_ready(self, timeout: float = 120) -> None:
        if not self._ready.wait(timeout):
            raise AssertionError("mesh not ready:\n" + "\n".join(self.lines))

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "onehop", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def gateway(self) -> dict[str, str]:
        return json.loads((self.data_dir / "run" / "gateway.json").read_text())["endpoints"]

    def status(self) -> list[dict]:
        result = self.cli("status", "--json")
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = Up(tmp_path_factory.mktemp("mesh") / "data")
    try:
        up.wait_ready()
        yield up
    finally:
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGTERM)
            try:
                up.process.wait(30)
            except subprocess.TimeoutExpired:
                up.process.kill()


@pytest.fixture(scope="module")
def rows(mesh: Up, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    table = credit_default(4_000, seed=11)
    csv_path = write_csv(table, tmp_path_factory.mktemp("csv") / "credit.csv")
    ingest = mesh.cli("ingest", str(csv_path), "--name", "credit", "--shards", "4")
    assert ingest.returncode == 0, ingest.stderr
    assert "4000 rows in 4 shards" in ingest.stdout
    train = mesh.cli(
        "train", "--dataset", "credit", "--target", TARGET, "--model", MODEL,
        "--epochs", "1", "--batch-size", "64",
    )  # fmt: skip
    assert train.returncode == 0, train.stdout + train.stderr
    assert "SUCCEEDED" in train.stdout
    features = [c for c in table.column_names if c != TARGET]
    return np.column_stack([table[f].to_numpy()[:16].astype(np.float32) for f in features])


def _http_infer(mesh: Up, batch: np.ndarray) -> tuple[np.ndarray, str, str]:
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(batch.shape),
                "data": batch.ravel().tolist(),
            }
        ]
    }
    url = f"http://{mesh.gateway()['http']}/v2/models/{MODEL}/infer"
    response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    values = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    return values, response.headers["onehop-cache"], response.headers["onehop-hops"]


def _grpc_infer(mesh: Up, batch: np.ndarray) -> tuple[np.ndarray, str]:
    request = grpc_service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    del tensor
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    with grpc.insecure_channel(mesh.gateway()["grpc"]) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply, call = stub.ModelInfer.with_call(request, timeout=30)
    trailers = dict(call.trailing_metadata())
    values = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(-1, 1)
    return values, trailers["onehop-cache"]


def _until_hit(infer, attempts: int = 50):  # type: ignore[no-untyped-def]
    """The write-back lands after the response (off the critical path): ask again, bounded."""
    for _ in range(attempts):
        result = infer()
        if result[1] == "hit":
            return result
        time.sleep(0.05)
    raise AssertionError(f"never a hit after {attempts} attempts: last outcome {result[1]}")


def test_miss_then_hit_with_same_outputs_over_http_and_grpc(mesh: Up, rows: np.ndarray) -> None:
    first, cache1, _ = _http_infer(mesh, rows[:8])
    second, _, hops2 = _until_hit(lambda: _http_infer(mesh, rows[:8]))
    assert cache1 == "miss"
    assert hops2 == "0"  # the gateway reads the co-located cache's memory map
    np.testing.assert_array_equal(first, second)
    assert ((first > 0) & (first < 1)).all()

    fresh, cache3 = _grpc_infer(mesh, rows[8:])
    again, _ = _until_hit(lambda: _grpc_infer(mesh, rows[8:]))
    assert cache3 == "miss"
    np.testing.assert_array_equal(fresh, again)
    mixed, cache5 = _grpc_infer(mesh, rows)
    assert cache5 == "hit"
    np.testing.assert_array_equal(mixed, np.concatenate([first, fresh]))


def test_tritonclient_http_and_grpc_with_default_options(mesh: Up, rows: np.ndarray) -> None:
    expected, _, _ = _http_infer(mesh, rows)
    # tritonclient registers the same `inference.*` protobuf symbols as our protos: own process.
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import tritonclient.grpc as tgrpc
        import tritonclient.http as thttp
        http_url, grpc_url, model, rows = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        x = np.asarray(rows, dtype=np.float32)
        out = {}
        hc = thttp.InferenceServerClient(http_url)
        assert hc.is_server_live() and hc.is_server_ready() and hc.is_model_ready(model)
        meta = hc.get_model_metadata(model)
        i = thttp.InferInput("input", list(x.shape), "FP32"); i.set_data_from_numpy(x)
        out["http"] = hc.infer(model, [i]).as_numpy("probability").tolist()
        out["http_meta_input"] = meta["inputs"][0]["shape"]
        gc = tgrpc.InferenceServerClient(grpc_url)
        assert gc.is_server_live() and gc.is_model_ready(model)
        g = tgrpc.InferInput("input", list(x.shape), "FP32"); g.set_data_from_numpy(x)
        out["grpc"] = gc.infer(model, [g]).as_numpy("probability").tolist()
        print(json.dumps(out))
        """
    )
    endpoints = mesh.gateway()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            endpoints["http"],
            endpoints["grpc"],
            MODEL,
            json.dumps(rows.tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    np.testing.assert_allclose(np.asarray(out["http"]), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["grpc"]), expected, rtol=1e-6)
    assert out["http_meta_input"] == [-1, rows.shape[1]]


def test_bad_input_gets_the_tables_codes_and_the_mesh_stays_up(mesh: Up, rows: np.ndarray) -> None:
    http = f"http://{mesh.gateway()['http']}"
    unknown = httpx.post(f"{http}/v2/models/nope/infer", json={"inputs": []}, timeout=10)
    assert unknown.status_code in (400, 404)
    wrong = httpx.post(
        f"{http}/v2/models/{MODEL}/infer",
        json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
        },
        timeout=10,
    )
    assert wrong.status_code == 400 and "error" in wrong.json()
    assert "Traceback" not in wrong.text
    missing = httpx.post(
        f"{http}/v2/models/nope/infer",
        json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 23], "data": [0.0] * 23}]
        },
        timeout=10,
    )
    assert missing.status_code == 404
    bad_name = mesh.cli("ingest", str(mesh.data_dir / "nothing.csv"), "--name", "../escape")
    assert bad_name.returncode != 0
    assert not (mesh.data_dir.parent / "escape").exists()
    assert all(row["health"] == "SERVING" for row in mesh.status())


def test_a_killed_cache_is_restarted_warm(mesh: Up, rows: np.ndarray) -> None:
    before, _, _ = _http_infer(mesh, rows[:8])  # cached by the earlier tests
    cache = next(row for row in mesh.status() if row["name"] == "cache")
    os.kill(cache["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = next(row for row in mesh.status() if row["name"] == "cache")
        if now["pid"] not in (None, cache["pid"]) and now["health"] == "SERVING":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("cache was not restarted:\n" + "\n".join(mesh.lines))
    assert now["endpoints"] == cache["endpoints"]  # restarted on its old ports
    after, outcome, _ = _http_infer(mesh, rows[:8])
    assert outcome == "hit"  # acknowledged entries survived kill -9
    np.testing.assert_array_equal(before, after)


def test_sigterm_stops_everything_cleanly(mesh: Up) -> None:
    pids = [row["pid"] for row in mesh.status()]
    mesh.process.send_signal(signal.SIGTERM)
    assert mesh.process.wait(60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
