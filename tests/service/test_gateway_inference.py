"""The gateway's inference path in-process over the REAL trainer, cache and shard services
(all on port 0): OIP v2 over gRPC (the servicer on a real grpc.aio server) and over HTTP (the
/v2 routes in a FastAPI app), the prediction cache's hit / partial / miss / bypass paths, the
zero-hop local replica, the error table, and the stock tritonclient clients in a subprocess.

Everything sync (pyarrow.flight, tritonclient) runs in a thread or a subprocess: the
services' grpc.aio servers share the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import grpc
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY

from cache_service.client import CacheClient
from gateway.http import error_response
from gateway.oip_grpc import InferenceServicer
from gateway.oip_http import oip_routes
from gateway.router import InferenceRouter
from onehop.channels import aio_channel, flight_location
from onehop.errors import DeadlineExceeded, OnehopError
from onehop.server import GrpcServer, Running
from onehop.settings import Settings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, trainer_pb2, trainer_pb2_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

DATASET = "loans"
MODEL = "risk"
N_FEATURES = 3
_seeds = count(100)


def fresh_rows(n: int) -> np.ndarray:
    """Rows no other test sent, so each test sees the cache from a known state."""
    return np.random.default_rng(next(_seeds)).normal(size=(n, N_FEATURES)).astype(np.float32)


def _table(rows: int = 240) -> pa.Table:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, N_FEATURES))
    label = (x @ np.array([1.0, -0.5, 0.25]) > 0).astype(np.int64)
    return pa.table({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "label": label})


def _ingest(address: str, table: pa.Table) -> None:
    client = flight.connect(flight_location(address))
    try:
        writer, metadata = client.do_put(flight.FlightDescriptor.for_path(DATASET), table.schema)
        with writer:
            for batch in table.to_batches(max_chunksize=60):
                writer.write_batch(batch)
            writer.done_writing()
            metadata.read()
    finally:
        client.close()


@dataclass
class Mesh:
    settings: Settings
    router: InferenceRouter
    grpc_address: str
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub
    http: httpx.AsyncClient
    app: FastAPI
    trainer_channel: grpc.aio.Channel
    cache_channel: grpc.aio.Channel
    cache: CacheClient


def build_app(router: InferenceRouter) -> FastAPI:
    """The /v2 routes with the gateway's error responses."""
    app = FastAPI()
    app.include_router(oip_routes(router))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OnehopError)
        return error_response(exc)

    app.add_exception_handler(OnehopError, on_error)
    return app


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(
    tmp_path_factory: pytest.TempPathFactory, inner_services: Any
) -> AsyncIterator[Mesh]:
    root = tmp_path_factory.mktemp("inference")
    settings = Settings(
        data_dir=root / "data", grace_seconds=0.5, cache_size_bytes=64 << 20, default_shards=2
    )
    started: list[Running] = []
    closers: list[Any] = []
    try:
        settings = await inner_services(settings, started)
        settings = settings.model_copy(update={"model_info_ttl_seconds": 60.0})
        await asyncio.to_thread(_ingest, settings.shard_address, _table())

        trainer_channel = aio_channel(settings.trainer_address, settings)
        cache_channel = aio_channel(settings.cache_address, settings)
        closers += [trainer_channel.close, cache_channel.close]
        await _train(trainer_channel)

        cache = CacheClient([settings.cache_address], settings)
        closers.insert(0, cache.close)
        router = InferenceRouter(settings, trainer_channel, cache)
        closers.insert(0, router.close)
        server = GrpcServer(settings, 0)
        server.add(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            InferenceServicer(router),
            "inference.GRPCInferenceService",
        )
        await server.start()
        await server.set_serving(True)
        started.append(Running({"grpc": server.address}, server.stop))
        client_channel = aio_channel(server.address, settings)
        closers.insert(0, client_channel.close)
        app = build_app(router)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        closers.insert(0, http.aclose)
        yield Mesh(
            settings=settings,
            router=router,
            grpc_address=server.address,
            stub=grpc_service_pb2_grpc.GRPCInferenceServiceStub(client_channel),
            http=http,
            app=app,
            trainer_channel=trainer_channel,
            cache_channel=cache_channel,
            cache=cache,
        )
    finally:
        for close in closers:
            await close()
        for running in reversed(started):
            await running.stop()


async def _train(channel: grpc.aio.Channel, seed: int = 0) -> None:
    """A one-epoch job on the tiny table: a registered (and promoted) model in a few seconds;
    another `seed` gives other weights."""
    stub = trainer_pb2_grpc.TrainerStub(channel)
    job = await stub.StartJob(
        trainer_pb2.StartJobRequest(
            dataset=DATASET,
            target="label",
            model_name=MODEL,
            hyperparameters=trainer_pb2.Hyperparameters(epochs=1, batch_size=64, seed=seed),
        ),
        timeout=30,
    )
    final = None
    async for status in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=90):
        final = status
    assert final is not None and final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final


async def grpc_infer(
    mesh: Mesh, rows: np.ndarray, model: str = MODEL, raw: bool = True
) -> tuple[pb.ModelInferResponse, dict[str, str]]:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    call = mesh.stub.ModelInfer(request, timeout=30)
    response = await call
    return response, dict(await call.trailing_metadata())


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    index = [o.name for o in response.outputs].index("probability")
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[index], dtype="<f4")
    else:
        values = np.asarray(response.outputs[index].contents.fp32_contents, dtype=np.float32)
    return values.reshape(list(response.outputs[index].shape))


async def pred_entries(mesh: Mesh) -> int:
    stats = await cache_pb2_grpc.CacheStub(mesh.cache_channel).GetStats(
        cache_pb2.GetStatsRequest(), timeout=5
    )
    return stats.namespaces["pred"].entries if "pred" in stats.namespaces else 0


def rows_counter(result: str) -> float:
    return REGISTRY.get_sample_value("onehop_gateway_infer_rows_total", {"result": result}) or 0.0


# --- the predict path ---------------------------------------------------------------------


async def test_grpc_miss_then_hit_then_partial(mesh: Mesh) -> None:
    rows = fresh_rows(4)
    first, trailing = await grpc_infer(mesh, rows)
    assert trailing["onehop-cache"] == "miss"
    assert first.model_name == MODEL and first.model_version
    p1 = probabilities(first)
    assert p1.shape == (4, 1) and ((p1 >= 0) & (p1 <= 1)).all()
    assert await mesh.router.drain(10)

    second, trailing = await grpc_infer(mesh, rows)
    # One hop: the cache lookup. No trainer call on a full hit.
    assert (trailing["onehop-cache"], trailing["onehop-hops"]) == ("hit", "1")
    np.testing.assert_array_equal(probabilities(second), p1)

    entries, misses = await pred_entries(mesh), rows_counter("miss")
    mixed = np.vstack([rows[:2], fresh_rows(1), rows[2:]])
    third, trailing = await grpc_infer(mesh, mixed, raw=False)
    assert (trailing["onehop-cache"], trailing["onehop-hops"]) == ("partial", "2")
    assert not third.raw_output_contents  # typed in, typed out
    p3 = probabilities(third)
    np.testing.assert_array_equal(p3[[0, 1, 3, 4]], p1)
    assert rows_counter("miss") - misses == 1  # only the new row went to the trainer
    assert await mesh.router.drain(10)
    assert await pred_entries(mesh) == entries + 1


async def test_http_json_then_binary_hit(mesh: Mesh) -> None:
    rows = fresh_rows(3)
    body = {
        "id": "r1",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 3], "data": rows.tolist()}],
    }
    reply = await mesh.http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.headers["onehop-cache"] == "miss"
    document = reply.json()
    assert document["id"] == "r1" and document["model_name"] == MODEL
    (output,) = [o for o in document["outputs"] if o["name"] == "probability"]
    assert output["shape"] == [3, 1] and output["datatype"] == "FP32"
    first = np.asarray(output["data"], dtype=np.float32).reshape(3, 1)
    assert await mesh.router.drain(10)

    # The same rows as tritonclient.http sends them by default: binary in, binary out.
    blob = rows.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [3, 3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    version = document["model_version"]
    reply = await mesh.http.post(
        f"/v2/models/{MODEL}/versions/{version}/infer",
        content=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.status_code == 200, reply.text
    assert (reply.headers["onehop-cache"], reply.headers["onehop-hops"]) == ("hit", "1")
    assert reply.headers["content-type"] == "application/octet-stream"
    length = int(reply.headers["Inference-Header-Content-Length"])
    document = json.loads(reply.content[:length])
    assert document["outputs"][0]["parameters"]["binary_data_size"] == 12
    np.testing.assert_array_equal(
        np.frombuffer(reply.content[length:], dtype="<f4").reshape(3, 1), first
    )


async def test_repeated_identical_requests_get_the_prebuilt_answer(mesh: Mesh) -> None:
    """A full hit's encoded answer is kept: the same request bytes under the same weights get
    it again with 0 hops, over HTTP and gRPC; other bytes go the row path."""
    rows = fresh_rows(2)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3], "data": rows.tolist()}]
    }
    path = f"/v2/models/{MODEL}/infer"
    assert (await mesh.http.post(path, json=body)).headers["onehop-cache"] == "miss"
    assert await mesh.router.drain(10)
    first = await mesh.http.post(path, json=body)
    assert (first.headers["onehop-cache"], first.headers["onehop-hops"]) == ("hit", "1")
    before = rows_counter("hit")
    again = await mesh.http.post(path, json=body)
    assert (again.headers["onehop-cache"], again.headers["onehop-hops"]) == ("hit", "0")
    assert again.content == first.content
    assert rows_counter("hit") - before == 2  # still counted as a hit of two rows

    first_grpc, trailing = await grpc_infer(mesh, rows)
    assert trailing["onehop-hops"] == "1"
    again_grpc, trailing = await grpc_infer(mesh, rows)
    assert (trailing["onehop-cache"], trailing["onehop-hops"]) == ("hit", "0")
    assert again_grpc == first_grpc


async def test_zero_hop_hits_from_the_local_replica(mesh: Mesh) -> None:
    rows = fresh_rows(2)
    first = await mesh.router.infer(MODEL, "", rows)
    assert first.cache == "miss"
    assert await mesh.router.drain(10)

    local = mesh.settings.model_copy(update={"cache_path": str(mesh.settings.data_dir / "cache")})
    router = InferenceRouter(local, mesh.trainer_channel, mesh.cache)
    try:
        await router.infer(MODEL, "", fresh_rows(1))  # resolves the model (2 hops)
        hit = await router.infer(MODEL, "", rows)
        assert (hit.cache, hit.hops) == ("hit", 0)
        np.testing.assert_array_equal(hit.outputs["probability"], first.outputs["probability"])
    finally:
        await router.close()


async def test_cache_stopped_is_a_bypass_and_the_request_succeeds(
    mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import cache_service.server

    own = mesh.settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("own-cache")})
    cache = await cache_service.server.start(own)
    channel = CacheClient([cache.endpoints["grpc"]], own)
    router = InferenceRouter(mesh.settings, mesh.trainer_channel, channel)
    try:
        rows = fresh_rows(3)
        first = await router.infer(MODEL, "", rows)
        assert first.cache == "miss"
        assert await router.drain(10)
        assert (await router.infer(MODEL, "", rows)).cache == "hit"

        await cache.stop()
        bypass = await router.infer(MODEL, "", rows)
        assert bypass.cache == "bypass"
        np.testing.assert_array_equal(bypass.outputs["probability"], first.outputs["probability"])
    finally:
        await router.close()
        await channel.close()
        await cache.stop()


# --- the error table ----------------------------------------------------------------------


async def test_unknown_model_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grpc_infer(mesh, fresh_rows(1), model="ghost")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost" in (caught.value.details() or "")

    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    reply = await mesh.http.post("/v2/models/ghost/infer", json=body)
    assert reply.status_code == 404
    assert "ghost" in reply.json()["error"]
    assert (await mesh.http.get("/v2/models/ghost")).status_code == 404


async def test_wrong_shape_is_invalid_argument(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grpc_infer(mesh, np.zeros((2, 4), dtype=np.float32))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3 features" in (caught.value.details() or "")

    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    reply = await mesh.http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert reply.status_code == 400
    assert "3 features" in reply.json()["error"]

    for content, headers in [
        (b"{not json", {}),
        (b"{}", {"Inference-Header-Content-Length": "999"}),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3]}]}', {}),
    ]:
        reply = await mesh.http.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]


async def test_versions_that_are_not_plain_numbers_are_invalid_argument(mesh: Mesh) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    # "²" is a digit to str.isdigit() but no version number (a fuzzer found the 500 it was).
    for version in ("²", "0", "-1", "1.5", "v1"):
        reply = await mesh.http.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=body)
        assert reply.status_code == 400, (version, reply.text)
        assert "version" in reply.json()["error"]


async def test_body_over_the_limit_is_413(mesh: Mesh) -> None:
    limit = mesh.settings.max_message_bytes
    reply = await mesh.http.post(f"/v2/models/{MODEL}/infer", content=b" " * (limit + 1))
    assert reply.status_code == 413


async def test_gzip_request_bodies_are_accepted(mesh: Mesh) -> None:
    import gzip

    rows = fresh_rows(1)
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": rows.ravel().tolist()}
        ]
    }
    reply = await mesh.http.post(
        f"/v2/models/{MODEL}/infer",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["shape"] == [1, 1]


# --- metadata and health ------------------------------------------------------------------


async def test_metadata_and_health_over_http(mesh: Mesh) -> None:
    server = (await mesh.http.get("/v2")).json()
    assert server["name"] == "onehop" and "binary_tensor_data" in server["extensions"]
    assert (await mesh.http.get("/v2/health/live")).status_code == 200
    assert (await mesh.http.get("/v2/health/ready")).status_code == 200
    metadata = (await mesh.http.get(f"/v2/models/{MODEL}")).json()
    assert metadata["name"] == MODEL
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}]
    assert {"name": "probability", "datatype": "FP32", "shape": [-1, 1]} in metadata["outputs"]
    version = metadata["versions"][-1]
    assert (await mesh.http.get(f"/v2/models/{MODEL}/versions/{version}")).status_code == 200
    assert (await mesh.http.get(f"/v2/models/{MODEL}/ready")).status_code == 200
    assert (await mesh.http.get(f"/v2/models/{MODEL}/versions/{version}/ready")).status_code == 200
    # The trainer answers ready=false for a model it does not know: the gateway says 404.
    assert (await mesh.http.get("/v2/models/ghost/ready")).status_code == 404


async def test_metadata_and_health_over_grpc(mesh: Mesh) -> None:
    assert (await mesh.stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
    assert (await mesh.stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
    server = await mesh.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert server.name == "onehop" and list(server.extensions) == ["binary_tensor_data"]
    metadata = await mesh.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=5)
    assert list(metadata.inputs[0].shape) == [-1, 3]
    ready = await mesh.stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=5)
    assert ready.ready


# --- stock clients ------------------------------------------------------------------------

_TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

http_url, grpc_url, model, rows = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
x = np.asarray(rows, dtype=np.float32)
out = {}

client = thttp.InferenceServerClient(http_url)
assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
metadata = client.get_model_metadata(model)
assert metadata["inputs"][0]["shape"] == [-1, x.shape[1]]
version = metadata["versions"][-1]
assert client.is_model_ready(model, model_version=version)
assert client.get_model_metadata(model, model_version=version)["name"] == model
tensor = thttp.InferInput("input", list(x.shape), "FP32")
tensor.set_data_from_numpy(x)
out["http"] = client.infer(model, [tensor]).as_numpy("probability").tolist()
out["http_version"] = client.infer(model, [tensor], model_version=version).as_numpy(
    "probability"
).tolist()
out["http_json"] = client.infer(
    model, [tensor], outputs=[thttp.InferRequestedOutput("probability", binary_data=False)]
).as_numpy("probability").tolist()
typed = thttp.InferInput("input", list(x.shape), "FP32")
typed.set_data_from_numpy(x, binary_data=False)
out["http_typed"] = client.infer(model, [typed], timeout=30_000_000).as_numpy(
    "probability"
).tolist()
try:
    client.infer("ghost", [tensor])
    raise AssertionError("unknown model answered")
except thttp.InferenceServerException as exc:
    assert exc.status() == "404", exc.status()

client = tgrpc.InferenceServerClient(grpc_url)
assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]
assert client.get_model_metadata(model, as_json=True)["inputs"][0]["datatype"] == "FP32"
tensor = tgrpc.InferInput("input", list(x.shape), "FP32")
tensor.set_data_from_numpy(x)
out["grpc"] = client.infer(model, [tensor]).as_numpy("probability").tolist()
out["grpc_version"] = client.infer(
    model, [tensor], model_version=version, client_timeout=30
).as_numpy("probability").tolist()
try:
    client.infer("ghost", [tensor])
    raise AssertionError("unknown model answered")
except tgrpc.InferenceServerException as exc:
    assert exc.status() == "StatusCode.NOT_FOUND", exc.status()
print(json.dumps(out))
"""


async def test_tritonclient_http_and_grpc_with_default_options(mesh: Mesh) -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(mesh.app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        rows = fresh_rows(2)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _TRITON_SCRIPT,
            f"127.0.0.1:{port}",
            mesh.grpc_address,
            MODEL,
            json.dumps(rows.tolist()),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
        assert process.returncode == 0, stderr.decode()[-3000:]
        results = json.loads(stdout)
        want = (await mesh.router.infer(MODEL, "", rows)).outputs["probability"]
        for name in ("http", "http_version", "http_json", "http_typed", "grpc", "grpc_version"):
            np.testing.assert_allclose(np.asarray(results[name], dtype=np.float32), want)
    finally:
        server.should_exit = True
        await serving
        sock.close()


# --- single-flight, degraded modes, admission ----------------------------------------------


def model_calls() -> float:
    return REGISTRY.get_sample_value("onehop_gateway_model_calls_total") or 0.0


async def test_concurrent_identical_misses_make_one_model_call(mesh: Mesh) -> None:
    rows = fresh_rows(3)
    await mesh.router.infer(MODEL, "", fresh_rows(1))  # the model is resolved
    before = model_calls()
    results = await asyncio.gather(*(mesh.router.infer(MODEL, "", rows) for _ in range(16)))
    assert model_calls() - before == 1
    # Late lookups may already find the rows the shared call wrote back.
    assert {r.cache for r in results} <= {"miss", "hit"}
    for result in results[1:]:
        np.testing.assert_array_equal(
            result.outputs["probability"], results[0].outputs["probability"]
        )


class Process:
    """A onehop service as its own process (`python -m <module>`), so it can be stopped
    with SIGSTOP or killed; endpoints from the run file it announces."""

    def __init__(self, module: str, service: str, settings: Settings):
        import os
        import subprocess

        self.settings = settings
        self.service = service
        env = {
            **os.environ,
            "ONEHOP_DATA_DIR": str(settings.data_dir),
            "ONEHOP_LOG_LEVEL": "WARNING",
            "ONEHOP_GRACE_SECONDS": "0.2",
            "ONEHOP_CACHE_SIZE_BYTES": str(64 << 20),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", module], env=env, stderr=subprocess.DEVNULL
        )

    async def endpoints(self) -> dict[str, str]:
        from onehop.launcher import read_run_file

        while True:
            info = read_run_file(self.settings.data_dir, self.service)
            if info is not None and info["pid"] == self.process.pid:
                return dict(info["endpoints"])
            assert self.process.poll() is None, f"{self.service} exited"
            await asyncio.sleep(0.05)

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def stop(self) -> None:
        import signal

        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait(10)


async def test_trainer_replicas_round_robin_and_fail_over(mesh: Mesh) -> None:
    """A second trainer process over the same registry: calls spread over both; SIGSTOP it
    and requests still succeed within their deadline (its attempts time out and move on);
    kill it and they go straight to the live one."""
    import signal

    from onehop.channels import Replicas

    replica = Process("trainer_service", "trainer", mesh.settings)
    channel = None
    try:
        address = (await replica.endpoints())["grpc"]
        channel = aio_channel(address, mesh.settings)
        replicas = Replicas([mesh.trainer_channel, channel], attempt_timeout=1.0)
        router = InferenceRouter(mesh.settings, replicas, mesh.cache)
        try:
            rows = [fresh_rows(2) for _ in range(6)]
            answers = [await router.infer(MODEL, "", r) for r in rows]
            assert all(a.cache == "miss" for a in answers)
            assert min(replicas.answered) > 0, replicas.answered  # both served

            replica.signal(signal.SIGSTOP)
            before = replicas.answered[0]
            for r, answer in zip(rows, answers, strict=True):
                again = await router.infer(MODEL, "", r + 100, timeout=20)
                assert again.cache == "miss"
                # The same weights answer wherever they run.
                assert again.outputs["probability"].shape == answer.outputs["probability"].shape
            assert replicas.ejected() == [False, True]
            assert replicas.answered[0] - before >= len(rows)

            # A request that can only reach the stopped replica ends at its own deadline.
            alone = InferenceRouter(mesh.settings, Replicas([channel], attempt_timeout=1.0), None)
            with pytest.raises(DeadlineExceeded):
                await alone.infer(MODEL, "", fresh_rows(1), timeout=0.5)
            await alone.close()

            # Killed: a call that starts at it meets UNAVAILABLE and moves to the live one.
            # (A fresh channel, so nothing is known of it yet: the call really goes there.)
            replica.stop()
            dead = aio_channel(address, mesh.settings)
            dead_first = Replicas([dead, mesh.trainer_channel], attempt_timeout=1.0)
            fresh = InferenceRouter(mesh.settings, dead_first, mesh.cache)
            try:
                result = await fresh.infer(MODEL, "", fresh_rows(2), timeout=20)
                assert result.cache == "miss"
                assert dead_first.ejected() == [True, False]
                assert dead_first.answered[0] == 0 and dead_first.answered[1] > 0
            finally:
                await fresh.close()
                await dead.close()
        finally:
            await router.close()
    finally:
        if channel is not None:
            await channel.close()
        replica.stop()


async def test_a_stopped_cache_process_is_bypassed_within_the_lookup_deadline(
    mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import signal

    own = mesh.settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("paused-cache")})
    cache = Process("cache_service", "cache", own)
    channel = None
    try:
        channel = CacheClient([(await cache.endpoints())["grpc"]], own)
        router = InferenceRouter(mesh.settings, mesh.trainer_channel, channel)
        try:
            rows = fresh_rows(2)
            first = await router.infer(MODEL, "", rows)
            assert await router.drain(10)
            assert (await router.infer(MODEL, "", rows)).cache == "hit"
            cache.signal(signal.SIGSTOP)
            paused = await router.infer(MODEL, "", rows, timeout=20)
            assert paused.cache == "bypass"
            np.testing.assert_array_equal(
                paused.outputs["probability"], first.outputs["probability"]
            )
        finally:
            await router.close()
    finally:
        if channel is not None:
            await channel.close()
        cache.stop()


async def test_overload_is_refused_fast_with_retry_after(mesh: Mesh) -> None:
    """One slot, no queue: while a request holds it, others get RESOURCE_EXHAUSTED / 429
    with Retry-After, over gRPC and HTTP, and the held request still succeeds."""
    tight = mesh.settings.model_copy(
        update={"max_concurrent_requests": 1, "max_queued_requests": 0}
    )
    router = InferenceRouter(tight, mesh.trainer_channel, mesh.cache)
    server = GrpcServer(tight, 0)
    server.add(
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        InferenceServicer(router),
        "inference.GRPCInferenceService",
    )
    await server.start()
    channel = aio_channel(server.address, tight)
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(router)), base_url="http://gw"
    )
    try:
        async with router.admission.slot():  # the one slot is taken
            request = pb.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name="input", datatype="FP32", shape=[1, 3])
            request.raw_input_contents.append(fresh_rows(1).tobytes())
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer(request, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(refused.value.trailing_metadata() or ())["retry-after"] == "1"

            body = {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}
                ]
            }
            reply = await http.post(f"/v2/models/{MODEL}/infer", json=body)
            assert reply.status_code == 429 and reply.json()["error"]
            assert reply.headers["retry-after"] == "1"
        assert (await router.infer(MODEL, "", fresh_rows(1))).cache == "miss"
    finally:
        await http.aclose()
        await channel.close()
        await server.stop()
        await router.close()


async def test_request_timeout_parameter_is_honoured(mesh: Mesh) -> None:
    """tritonclient's `timeout` (parameters.timeout, microseconds): 1 µs cannot be met."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(fresh_rows(1).tobytes())
    request.parameters["timeout"].int64_param = 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# --- expired model info: stale-while-revalidate -------------------------------------------


def stale_lookups() -> float:
    return REGISTRY.get_sample_value("onehop_gateway_stale_model_info_total") or 0.0


def failed_refreshes() -> float:
    sample = "onehop_gateway_model_info_refreshes_total"
    return REGISTRY.get_sample_value(sample, {"result": "failed"}) or 0.0


async def test_cached_predictions_outlive_the_model_info_ttl_while_the_trainer_is_stopped(
    mesh: Mesh,
) -> None:
    """A trainer process under SIGSTOP: past the model-info TTL, and after the refresh that
    asks it has failed, all-hit requests are still answered (with the last known weights)
    instead of waiting on it into DEADLINE_EXCEEDED."""
    import signal

    from onehop.channels import Replicas

    replica = Process("trainer_service", "trainer", mesh.settings)
    channel = None
    try:
        channel = aio_channel((await replica.endpoints())["grpc"], mesh.settings)
        short = mesh.settings.model_copy(update={"model_info_ttl_seconds": 0.2})
        router = InferenceRouter(short, Replicas([channel], attempt_timeout=1.0), mesh.cache)
        try:
            rows = fresh_rows(4)
            first = await router.infer(MODEL, "", rows, timeout=20)
            assert first.cache == "miss"
            assert await router.drain(10)

            replica.signal(signal.SIGSTOP)
            stale, failed = stale_lookups(), failed_refreshes()
            answers = []
            async with asyncio.timeout(30):
                while failed_refreshes() == failed:
                    answers.append(await router.infer(MODEL, "", rows, timeout=1.0))
                    await asyncio.sleep(0.05)
            answers.append(await router.infer(MODEL, "", rows, timeout=1.0))
            assert stale_lookups() > stale
            assert {(a.cache, a.model_version, a.digest) for a in answers} == {
                ("hit", first.model_version, first.digest)
            }
            for answer in answers:
                np.testing.assert_array_equal(
                    answer.outputs["probability"], first.outputs["probability"]
                )
        finally:
            replica.signal(signal.SIGCONT)
            await router.close()
    finally:
        if channel is not None:
            await channel.close()
        replica.stop()


async def test_a_promotion_is_seen_after_the_model_info_ttl(mesh: Mesh) -> None:
    """A live trainer promotes other weights: once the TTL has passed, a refresh picks them
    up; the kept (prebuilt) answer and the cached rows of the old weights are not served."""
    short = mesh.settings.model_copy(update={"model_info_ttl_seconds": 0.2})
    router = InferenceRouter(short, mesh.trainer_channel, mesh.cache)
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(router)), base_url="http://gw"
    )
    trainer = trainer_pb2_grpc.TrainerStub(mesh.trainer_channel)
    serving = await trainer.GetModel(trainer_pb2.GetModelRequest(name=MODEL), timeout=10)
    rows = fresh_rows(2)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3], "data": rows.tolist()}]
    }

    async def post() -> httpx.Response:
        reply = await http.post(f"/v2/models/{MODEL}/infer", json=body)
        assert reply.status_code == 200, reply.text
        return reply

    try:
        assert (await post()).headers["onehop-cache"] == "miss"
        assert await router.drain(10)
        await post()
        kept = await post()
        assert (kept.headers["onehop-cache"], kept.headers["onehop-hops"]) == ("hit", "0")

        await _train(mesh.trainer_channel, seed=1)  # registers and promotes new weights
        promoted = await trainer.GetModel(trainer_pb2.GetModelRequest(name=MODEL), timeout=10)
        assert promoted.weights_digest != serving.weights_digest
        async with asyncio.timeout(30):
            while (reply := await post()).json()["model_version"] == str(serving.version):
                await asyncio.sleep(0.05)
        assert reply.json()["model_version"] == str(promoted.version)
        assert reply.headers["onehop-cache"] == "miss"  # the new weights' keys
        assert reply.content != kept.content
    finally:
        await trainer.PromoteModel(
            trainer_pb2.PromoteModelRequest(name=MODEL, version=serving.version), timeout=30
        )
        await http.aclose()
        await router.close()
