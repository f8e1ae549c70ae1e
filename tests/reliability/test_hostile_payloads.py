"""Hostile payloads: oversized and deeply nested JSON at the HTTP bridge, malformed Arrow IPC
through Flight DoPut (frames mutated by hypothesis), malformed Parquet files, path and URI
tricks in dataset and model names, and a malicious pickle presented as model weights and as
a training checkpoint (its sentinel file must never appear). Each is refused with a client
code, nothing partial is published, nothing escapes the data dir, no service dies."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from harness import (
    FULL,
    MODEL,
    Clients,
    MeshUnderTest,
    Report,
    Workloads,
    check_whole,
    code_of,
    infer_request,
)
from hostile import (
    CLIENT_CODES,
    FLIGHT,
    LEAKS,
    NAMES,
    Method,
    flight_code,
    flight_data,
    mutated,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.onehop.v1 import data_pb2, gateway_pb2, trainer_pb2

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

HTTP_CLIENT_STATUSES = {400, 404, 405, 413, 415, 422, 429}


def http(mesh: MeshUnderTest) -> str:
    return f"http://{mesh.endpoint('gateway', 'http')}"


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code in HTTP_CLIENT_STATUSES, (response.status_code, response.text[:300])
    assert not any(marker in response.text for marker in LEAKS), response.text[:300]


def dataset_names(clients: Clients) -> set[str]:
    reply = clients.gateway.ListDatasets(gateway_pb2.ListDatasetsRequest(), timeout=10)
    return {d.name for d in reply.datasets}


# --- JSON ------------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


def test_oversized_and_deeply_nested_json(
    mesh: MeshUnderTest, workloads: Workloads, report: Report
) -> None:
    pids = mesh.all_pids()
    features = workloads.pool.shape[1]
    infer = f"{http(mesh)}/v2/models/{MODEL}/infer"
    bodies = {
        "nested arrays": nested(100_000),
        "nested objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "huge number": b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1],"data":[1'
        + b"0" * 5000
        + b"]}]}",
        "nan literal": b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1],"data":[NaN]}]}',
        "shape overflow": json.dumps(
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [2**62, 2**62], "data": [0.0]}
                ]
            }
        ).encode(),
        "negative shape": json.dumps(
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [-1, features], "data": [0.0]}
                ]
            }
        ).encode(),
        "wrong types": b'{"inputs": "x", "outputs": 7}',
        "invalid utf-8": b'{"inputs":[{"name":"\xff\xfe","datatype":"FP32"}]}',
        "binary header lie": b"{}" + os.urandom(64),
        "oversized": b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,23],"data":['
        + b"0," * (40 << 20)
        + b"0]}]}",
    }
    headers = {"binary header lie": {"Inference-Header-Content-Length": "999999"}}
    with httpx.Client(timeout=60) as client:
        for name, body in bodies.items():
            response = client.post(
                infer,
                content=body,
                headers={"Content-Type": "application/json", **headers.get(name, {})},
            )
            report.bad_input("hostile JSON")
            assert_refused(response)
        for path in ("/v1/jobs", "/v1/datasets"):
            response = client.post(
                http(mesh) + path,
                content=nested(100_000),
                headers={"Content-Type": "application/json"},
            )
            report.bad_input("hostile JSON")
            assert_refused(response)
    assert mesh.all_pids() == pids
    mesh.wait_healthy(timeout=10)


# --- Arrow IPC through Flight DoPut ----------------------------------------------------------


def ipc_messages() -> list[tuple[bytes, bytes]]:
    """(flatbuffer header, body) of each IPC message of a small valid stream."""
    table = pa.table({"id": np.arange(64, dtype=np.int64), "x": np.linspace(0, 1, 64)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(sink.getvalue()))
    return [(m.metadata.to_pybytes(), m.body.to_pybytes() if m.body else b"") for m in reader]


DOPUT = Method("shard", "flight", f"/{FLIGHT}/DoPut", True, True, None)


def do_put_raw(
    channel: grpc.Channel, frames: list[bytes], deadline: float = 10.0
) -> tuple[str, str]:
    try:
        replies = channel.stream_stream(DOPUT.path)(iter(frames), timeout=deadline)
        for _ in replies:
            pass
        return "OK", ""
    except grpc.RpcError as exc:
        details = exc.details() or ""  # type: ignore[attr-defined]
        return flight_code(DOPUT, exc.code().name, details), details  # type: ignore[attr-defined]


@st.composite
def broken_ipc(draw: st.DrawFn) -> list[bytes]:
    (schema_h, _), (batch_h, batch_b) = ipc_messages()[:2]
    part = draw(st.sampled_from(["schema", "batch header", "batch body", "order"]))
    descriptor = flight.FlightDescriptor.for_path("ipcfuzz").serialize()
    if part == "schema":
        schema_h = draw(mutated(schema_h))
    elif part == "batch header":
        batch_h = draw(mutated(batch_h))
    elif part == "batch body":
        batch_b = draw(mutated(batch_b))
    frames = [flight_data(schema_h, descriptor=descriptor), flight_data(batch_h, batch_b)]
    return frames[::-1] if part == "order" else frames


@pytest.mark.parametrize("service", ["shard", "gateway"])
def test_malformed_arrow_ipc_through_doput(
    service: str, mesh: MeshUnderTest, clients: Clients, workloads: Workloads, report: Report
) -> None:
    pid = mesh.pid(service)
    answers: list[tuple[str, str]] = []
    with grpc.insecure_channel(mesh.endpoint(service, "flight")) as channel:

        @settings(
            max_examples=120 if FULL else 25,
            deadline=None,
            database=None,
            derandomize=not FULL,
            suppress_health_check=list(HealthCheck),
        )
        @given(frames=broken_ipc())
        def probe(frames: list[bytes]) -> None:
            code, details = do_put_raw(channel, frames)
            answers.append((code, details))
            assert code in CLIENT_CODES, (code, details[:300])
            assert not any(marker in details for marker in LEAKS), details[:300]

        try:
            probe()
        finally:
            report.bad_input("malformed Arrow IPC", len(answers))
    assert mesh.pid(service) == pid, f"{service} died on malformed IPC"
    # Whatever was accepted reads back whole; nothing half-written is listed.
    assert check_whole(clients) == []


# --- Parquet ---------------------------------------------------------------------------------


def bad_parquet_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    good = root / "good.parquet"
    pq.write_table(pa.table({"a": np.arange(1000), "b": np.ones(1000)}), good)
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "garbage with magic": b"PAR1" + os.urandom(2048) + b"PAR1",
        "footer length lie": data[:-8] + (2**31 - 1).to_bytes(4, "little") + b"PAR1",
        "random": os.urandom(4096),
        "pickle": pickle.dumps({"a": 1}),
    }
    out = {}
    for name, content in files.items():
        path = root / f"{name.replace(' ', '-')}.parquet"
        path.write_bytes(content)
        out[name] = path
    return out


def test_malformed_parquet_is_refused(
    mesh: MeshUnderTest, clients: Clients, workloads: Workloads, report: Report, tmp_path: Path
) -> None:
    before = dataset_names(clients)
    files = bad_parquet_files(tmp_path)
    env = {**os.environ, "ONEHOP_DATA_DIR": str(mesh.data_dir)}
    for name, path in files.items():
        # The CLI client (reads the file itself, streams it to the gateway)...
        cli = subprocess.run(
            [sys.executable, "-m", "onehop", "ingest", str(path), "--name", "badparquet"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        report.bad_input("malformed Parquet")
        assert cli.returncode != 0, (name, cli.stdout)
        assert "error:" in cli.stderr and "Traceback" not in cli.stderr, (name, cli.stderr[-500:])
        # ...and the HTTP upload (the body is the file), where the mesh reads it.
        response = httpx.post(
            f"{http(mesh)}/v1/datasets",
            params={"name": "badparquet", "format": "parquet"},
            content=path.read_bytes(),
            timeout=60,
        )
        report.bad_input("malformed Parquet")
        assert_refused(response)
    assert "badparquet" not in dataset_names(clients) - before
    mesh.wait_healthy(timeout=10)


# --- path and URI tricks ---------------------------------------------------------------------

# "CON" is a fine name on Linux: only the tricks that must be refused everywhere.
TRICKS = [n for n in NAMES if n not in ("risk", "default", "CON")] + [
    "credit/../../x",
    "credit@1",
    "~root",
    "\\..\\..\\windows",
    "http://169.254.169.254/latest",
    "credit\n",
]


SOURCES = [
    "/etc/passwd",
    "file:///etc/passwd",
    "../../../../etc/passwd",
    "/proc/self/environ",
    "http://169.254.169.254/latest/meta-data",
    "hdfs://namenode/x.csv",
    "mock:///x",
    "s3://bucket/../../x.csv",
]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_path_and_uri_tricks_in_names(
    mesh: MeshUnderTest, clients: Clients, workloads: Workloads, report: Report
) -> None:
    outside = mesh.data_dir.parent
    before_outside = snapshot(outside) - {p for p in snapshot(outside) if p.startswith("data")}
    table = pa.table({"a": [1, 2, 3]})
    with httpx.Client(timeout=10) as client:
        for name in TRICKS:
            try:
                clients.ingest(name, table, deadline=10)
                accepted = "OK"
            except Exception as exc:
                accepted = code_of(exc)
            assert accepted in ("INVALID_ARGUMENT", "NOT_FOUND"), (name, accepted)
            for version in ("", "1"):
                try:
                    clients.plan(name, int(version or 0), deadline=10)
                    planned = "OK"
                except Exception as exc:
                    planned = code_of(exc)
                assert planned in ("INVALID_ARGUMENT", "NOT_FOUND"), (name, planned)
            request = trainer_pb2.StartJobRequest(dataset=name, target="default", model_name=name)
            with pytest.raises(grpc.RpcError) as started:
                clients.gateway.StartJob(request, timeout=10)
            assert started.value.code().name in ("INVALID_ARGUMENT", "NOT_FOUND"), name
            with pytest.raises(grpc.RpcError) as inferred:
                clients.inference.ModelInfer(infer_request(name, workloads.pool[:1]), timeout=10)
            assert inferred.value.code().name in ("INVALID_ARGUMENT", "NOT_FOUND"), name
            for path in (
                f"/v1/models/{quote(name, safe='')}",
                f"/v2/models/{quote(name, safe='')}",
            ):
                # "", "." and ".." are normalised away by the HTTP client itself.
                if name not in ("", ".", ".."):
                    assert_refused(client.get(http(mesh) + path))
            report.bad_input("path/URI tricks", 7)
    # Server-side sources: the shard service's "ingest" action reads a path or URI itself.
    shard = flight.connect(f"grpc+tcp://{mesh.endpoint('shard', 'flight')}")
    for source in SOURCES:
        body = data_pb2.IngestRequest(dataset="srcfuzz", source=source).SerializeToString()
        try:
            list(shard.do_action(flight.Action("ingest", body)))
            answer = "OK"
        except Exception as exc:
            answer = code_of(exc)
        report.bad_input("path/URI tricks")
        # An allowed scheme (s3) with no network here is a dependency down, not a trick.
        allowed = {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"}
        if source.startswith("s3://"):
            allowed.add("UNAVAILABLE")
        assert answer in allowed, (source, answer)
    shard.close()
    assert "srcfuzz" not in dataset_names(clients)
    assert not (dataset_names(clients) & set(TRICKS))
    after_outside = snapshot(outside) - {p for p in snapshot(outside) if p.startswith("data")}
    assert after_outside == before_outside, after_outside - before_outside
    # /tmp is shared with other processes: only the names a trick would create are checked.
    assert not {"escape", "b", "x", "passwd"} & set(os.listdir("/tmp"))
    mesh.wait_healthy(timeout=10)


# --- a malicious pickle ----------------------------------------------------------------------


class Evil:
    """Unpickling this creates the sentinel file: proof that untrusted bytes were executed."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.sentinel), "w"))


def plant_model(registry: Path, name: str, weights: bytes) -> None:
    """A registry version of `name` whose weights file is `weights`, with metadata copied
    from the real model and a digest that matches (the attacker can write the volume)."""
    source = registry / MODEL / "1"
    target = registry / name / "1"
    shutil.rmtree(registry / name, ignore_errors=True)
    target.mkdir(parents=True)
    meta = json.loads((source / "model.json").read_text())
    meta.update(name=name, version=1, weights_digest=hashlib.sha256(weights).hexdigest())
    for file in source.iterdir():
        if file.suffix == ".json" and file.name != "model.json":
            shutil.copy(file, target / file.name)
    (target / "model.json").write_text(json.dumps(meta))
    (target / "model.safetensors").write_bytes(weights)
    (registry / name / "CURRENT").write_text("1\n")


def test_malicious_pickle_as_model_weights_and_checkpoint(
    mesh: MeshUnderTest, clients: Clients, workloads: Workloads, report: Report, tmp_path: Path
) -> None:
    import torch

    sentinel = tmp_path / "PWNED"
    evil = Evil(sentinel)
    raw = pickle.dumps({"weights": evil})
    buffer = io.BytesIO()
    torch.save({"weights": evil}, buffer)
    registry = mesh.data_dir / "trainer" / "registry"
    assert (registry / MODEL / "1" / "model.json").exists(), sorted(registry.rglob("*"))
    for name, weights in (("evil-pickle", raw), ("evil-torch", buffer.getvalue())):
        plant_model(registry, name, weights)
        with pytest.raises(grpc.RpcError) as refused:
            clients.infer(name, workloads.pool[:1], deadline=15)
        assert refused.value.code().name in ("FAILED_PRECONDITION", "NOT_FOUND"), refused.value
        response = httpx.post(f"{http(mesh)}/v1/models/{name}/versions/1/promote", timeout=15)
        assert response.status_code in HTTP_CLIENT_STATUSES, response.text
        report.bad_input("malicious pickle", 2)
    # The training checkpoint of a resumed job, through the trainer's own command line.
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "checkpoint.safetensors").write_bytes(buffer.getvalue())
    csv = tmp_path / "small.csv"
    csv.write_text("a,b,default\n" + "\n".join(f"{i},{i % 7},{i % 2}" for i in range(200)))
    resumed = subprocess.run(
        [sys.executable, "-m", "trainer_service.train", "--data", str(csv), "--target", "default",
         "--model", "evil-resume", "--epochs", "1", "--resume", "--checkpoint-dir", str(checkpoints),
         "--registry", str(tmp_path / "registry")],
        env={**os.environ, "ONEHOP_DATA_DIR": str(tmp_path / "data")},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    report.bad_input("malicious pickle")
    assert resumed.returncode != 0, resumed.stdout[-500:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-800:]
    assert not sentinel.exists(), "a pickle was executed"
    for name in ("evil-pickle", "evil-torch"):  # the planted versions go; the real one serves
        shutil.rmtree(registry / name)
    mesh.wait_healthy(timeout=10)
    assert clients.infer(MODEL, workloads.pool[:1], deadline=15).shape == (1, 1)
