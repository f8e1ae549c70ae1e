"""The gateway's assembly in-process, over the REAL shard, cache and trainer services (all on
port 0): Flight ingest/plan/read with stock pyarrow clients, the /v1 HTTP bridge and the
onehop.v1.Gateway gRPC service, and the error table on every front.

Everything sync (pyarrow.flight) runs in a thread: the services' grpc.aio servers share the
test's event loop, so a blocking call on it would stall the very servers it talks to.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import pytest_asyncio

from onehop.channels import aio_channel, flight_location
from onehop.errors import (
    InvalidArgument,
    NotFound,
    OnehopError,
    Unavailable,
    from_flight_error,
)
from onehop.server import Running
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, data_pb2, gateway_pb2, gateway_pb2_grpc, trainer_pb2

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

DATASET = "loans"
MODEL = "risk"
FEATURES = ["x1", "x2", "x3"]
SHARDS = 3


def _table(rows: int = 240) -> pa.Table:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, 3))
    label = (x @ np.array([1.0, -0.5, 0.25]) > 0).astype(np.int64)
    return pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "x1": x[:, 0],
            "x2": x[:, 1],
            "x3": x[:, 2],
            "label": label,
        }
    )


@dataclass
class Mesh:
    settings: Settings
    gateway: dict[str, str]
    cache: dict[str, str]
    shard: dict[str, str]
    root: Path
    table: pa.Table
    ingested: data_pb2.DatasetInfo

    @property
    def http(self) -> str:
        return f"http://{self.gateway['http']}"

    def flight_client(self) -> flight.FlightClient:
        return flight.connect(flight_location(self.gateway["flight"]))


def _ingest(address: str, descriptor: flight.FlightDescriptor, table: pa.Table) -> bytes | None:
    """A stock pyarrow client's DoPut, several batches; returns the PutResult metadata."""
    client = flight.connect(flight_location(address))
    try:
        writer, metadata = client.do_put(descriptor, table.schema)
        with writer:
            for batch in table.to_batches(max_chunksize=50):
                writer.write_batch(batch)
            writer.done_writing()
            answer = metadata.read()
        return None if answer is None else answer.to_pybytes()
    finally:
        client.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(
    tmp_path_factory: pytest.TempPathFactory, inner_services: Any
) -> AsyncIterator[Mesh]:
    import gateway.server

    root = tmp_path_factory.mktemp("mesh")
    settings = Settings(
        data_dir=root / "data",
        gateway_http_port=0,
        gateway_grpc_port=0,
        gateway_flight_port=0,
        grace_seconds=0.5,
        cache_size_bytes=64 << 20,
    )
    started: list[Running] = []
    try:
        settings = await inner_services(settings, started)
        gw = await gateway.server.start(settings)
        started.append(gw)

        table = _table()
        command = data_pb2.IngestRequest(dataset=DATASET, shards=SHARDS)
        answer = await asyncio.to_thread(
            _ingest,
            gw.endpoints["flight"],
            flight.FlightDescriptor.for_command(command.SerializeToString()),
            table,
        )
        assert answer is not None, "DoPut must answer with the DatasetInfo"
        yield Mesh(
            settings=settings,
            gateway=gw.endpoints,
            cache=started[0].endpoints,
            shard=started[1].endpoints,
            root=root,
            table=table,
            ingested=data_pb2.DatasetInfo.FromString(answer),
        )
    finally:
        for running in reversed(started):
            await running.stop()


async def _eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Wait for an asynchronous effect (the write-through to the cache) by polling a
    condition with a deadline; returns the first truthy result."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.select(["id", *FEATURES, "label"]).sort_by("id").to_pylist()


# --- data plane: Flight ------------------------------------------------------------------


async def test_ingest_answers_with_the_new_version(mesh: Mesh) -> None:
    info = mesh.ingested
    assert info.name == DATASET
    assert info.version >= 1
    assert info.rows == mesh.table.num_rows
    assert len(info.shards) == SHARDS
    assert sum(shard.rows for shard in info.shards) == mesh.table.num_rows


async def test_list_plan_and_read_every_endpoint_directly_and_via_the_gateway(
    mesh: Mesh,
) -> None:
    shard_location = flight_location(mesh.shard["flight"])
    cache_location = flight_location(mesh.cache["flight"])

    def list_and_plan() -> tuple[list[flight.FlightInfo], flight.FlightInfo, pa.Schema]:
        client = mesh.flight_client()
        try:
            listed = list(client.list_flights())
            planned = client.get_flight_info(flight.FlightDescriptor.for_path(DATASET))
            schema = client.get_schema(flight.FlightDescriptor.for_path(DATASET)).schema
            return listed, planned, schema
        finally:
            client.close()

    listed, planned, schema = await asyncio.to_thread(list_and_plan)
    # Listed flights name their dataset and version by path, as the shard service does.
    by_name = {i.descriptor.path[0].decode(): i for i in listed}
    assert len(by_name[DATASET].endpoints) == SHARDS
    assert by_name[DATASET].total_records == mesh.table.num_rows
    assert schema.names == mesh.table.schema.names
    assert len(planned.endpoints) == SHARDS
    for endpoint in planned.endpoints:
        # The shard service is always the last resort.
        assert endpoint.locations[-1].uri.decode() == shard_location

    def read_direct(info: flight.FlightInfo) -> pa.Table:
        """Redeem each ticket at its first location: the inner service, one hop."""
        parts = []
        for endpoint in info.endpoints:
            client = flight.connect(endpoint.locations[0])
            try:
                parts.append(client.do_get(endpoint.ticket).read_all())
            finally:
                client.close()
        return pa.concat_tables(parts)

    def read_via_gateway(info: flight.FlightInfo) -> pa.Table:
        client = mesh.flight_client()
        try:
            return pa.concat_tables(client.do_get(e.ticket).read_all() for e in info.endpoints)
        finally:
            client.close()

    expected = _rows(mesh.table)
    assert _rows(await asyncio.to_thread(read_direct, planned)) == expected
    assert _rows(await asyncio.to_thread(read_via_gateway, planned)) == expected

    # Once read, the shards are written through to the cache: the plan puts it first.
    def cache_first() -> flight.FlightInfo | None:
        client = mesh.flight_client()
        try:
            info = client.get_flight_info(flight.FlightDescriptor.for_path(DATASET))
        finally:
            client.close()
        firsts = {e.locations[0].uri.decode() for e in info.endpoints}
        return info if firsts == {cache_location} else None

    replanned = await _eventually(cache_first)
    assert replanned is not None, "the plan never put the cache first"
    for endpoint in replanned.endpoints:
        assert [loc.uri.decode() for loc in endpoint.locations][-1] == shard_location
    assert _rows(await asyncio.to_thread(read_direct, replanned)) == expected
    assert _rows(await asyncio.to_thread(read_via_gateway, replanned)) == expected


async def test_ingest_by_path_takes_the_default_shard_count(mesh: Mesh) -> None:
    table = mesh.table.slice(0, 40)
    answer = await asyncio.to_thread(
        _ingest, mesh.gateway["flight"], flight.FlightDescriptor.for_path("by-path"), table
    )
    assert answer is not None
    info = data_pb2.DatasetInfo.FromString(answer)
    assert (info.name, info.version, info.rows) == ("by-path", 1, 40)
    assert len(info.shards) == mesh.settings.default_shards

    def read_back() -> pa.Table:
        client = mesh.flight_client()
        try:
            plan = client.get_flight_info(flight.FlightDescriptor.for_path("by-path", "1"))
            return pa.concat_tables(client.do_get(e.ticket).read_all() for e in plan.endpoints)
        finally:
            client.close()

    assert _rows(await asyncio.to_thread(read_back)) == _rows(table)


async def test_plan_by_version_and_by_command(mesh: Mesh) -> None:
    version = mesh.ingested.version

    def plan_both() -> tuple[flight.FlightInfo, flight.FlightInfo]:
        client = mesh.flight_client()
        try:
            by_path = client.get_flight_info(
                flight.FlightDescriptor.for_path(DATASET, str(version))
            )
            request = data_pb2.DataRequest(dataset=DATASET, columns=["id", "x1"])
            by_command = client.get_flight_info(
                flight.FlightDescriptor.for_command(request.SerializeToString())
            )
            return by_path, by_command
        finally:
            client.close()

    by_path, by_command = await asyncio.to_thread(plan_both)
    assert len(by_path.endpoints) == SHARDS
    assert by_command.schema.names == ["id", "x1"]


# --- control plane: HTTP /v1 and gRPC onehop.v1.Gateway -----------------------------------


async def test_http_datasets_job_and_model_features(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.http, timeout=60) as http:
        datasets = (await http.get("/v1/datasets")).json()["datasets"]
        assert DATASET in {d["name"] for d in datasets}

        body = {
            "dataset": DATASET,
            "target": "label",
            "model": MODEL,
            "epochs": 1,
            "batch_size": 32,
            "hidden": [8],
            "features": FEATURES,
            "seed": 1,
        }
        started = await http.post("/v1/jobs", json=body)
        assert started.status_code == 202, started.text
        job_id = started.json()["job_id"]
        assert started.headers["location"] == f"/v1/jobs/{job_id}"

        # Wait for the job over the gRPC stream (no polling): it ends when the job does.
        async with aio_channel(mesh.gateway["grpc"], mesh.settings) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            states = [
                status.state
                async for status in stub.WatchJob(
                    trainer_pb2.WatchJobRequest(job_id=job_id), timeout=90
                )
            ]
        assert states[-1] == trainer_pb2.JOB_STATE_SUCCEEDED

        job = (await http.get(f"/v1/jobs/{job_id}")).json()
        assert job["state"] == "JOB_STATE_SUCCEEDED"
        assert job["model_name"] == MODEL and job["model_version"] >= 1
        jobs = (await http.get("/v1/jobs")).json()["jobs"]
        assert job_id in {j["job_id"] for j in jobs}

        model = await http.get(f"/v1/models/{MODEL}")
        assert model.status_code == 200, model.text
        assert model.json()["features"] == FEATURES
        assert model.json()["target"] == "label"
        models = (await http.get("/v1/models")).json()["models"]
        assert MODEL in {m["name"] for m in models}


async def test_grpc_list_datasets_and_cluster_status(mesh: Mesh) -> None:
    async with aio_channel(mesh.gateway["grpc"], mesh.settings) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        datasets = await stub.ListDatasets(gateway_pb2.ListDatasetsRequest(), timeout=10)
        status = await stub.GetClusterStatus(gateway_pb2.GetClusterStatusRequest(), timeout=10)
    listed = {d.name: d for d in datasets.datasets}
    assert listed[DATASET].rows == mesh.table.num_rows
    health = {s.name: s.health for s in status.services}
    assert health == {"cache": "SERVING", "shard": "SERVING", "trainer": "SERVING"}

    async with httpx.AsyncClient(base_url=mesh.http, timeout=10) as http:
        cluster = (await http.get("/v1/cluster")).json()["services"]
    assert {s["name"]: s["health"] for s in cluster} == health


async def test_metrics_and_docs(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.http, timeout=10) as http:
        await http.get("/v1/datasets")
        metrics = await http.get("/metrics")
        docs = await http.get("/docs")
        openapi = (await http.get("/openapi.json")).json()
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'onehop_gateway_http_requests_total{method="GET",route="/v1/datasets"' in metrics.text
    assert docs.status_code == 200
    assert {"/v1/jobs", "/v1/models/{name}", "/v1/datasets"} <= set(openapi["paths"])


# --- the error table on every front --------------------------------------------------------


async def test_bad_dataset_name_is_invalid_argument_and_writes_nothing(mesh: Mesh) -> None:
    def put_bad() -> OnehopError:
        try:
            _ingest(mesh.gateway["flight"], flight.FlightDescriptor.for_path("../x"), mesh.table)
        except (flight.FlightError, pa.ArrowException) as exc:
            assert "Traceback" not in str(exc)
            return from_flight_error(exc)
        raise AssertionError("DoPut of '../x' was accepted")

    error = await asyncio.to_thread(put_bad)
    assert isinstance(error, InvalidArgument), error
    assert "invalid dataset name" in error.message

    async with httpx.AsyncClient(base_url=mesh.http, timeout=10) as http:
        bad = await http.post(
            "/v1/jobs", json={"dataset": "../x", "target": "label", "model": MODEL}
        )
    assert bad.status_code == 400
    assert "invalid dataset name" in bad.json()["error"]

    async with aio_channel(mesh.gateway["grpc"], mesh.settings) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.StartJob(
                trainer_pb2.StartJobRequest(dataset="../x", target="label", model_name=MODEL),
                timeout=10,
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in (raised.value.details() or "")
    # Nothing was written for it, in or out of the data directory.
    assert list(mesh.root.rglob("x")) == []
    assert not (mesh.root / "x").exists() and not (mesh.root.parent / "x").exists()


async def test_flight_not_found_and_malformed_descriptors(mesh: Mesh) -> None:
    def errors() -> list[OnehopError]:
        client = mesh.flight_client()
        found = []
        try:
            for descriptor in (
                flight.FlightDescriptor.for_path("nope"),
                flight.FlightDescriptor.for_command(b"\xff\xff\xff"),
                flight.FlightDescriptor.for_path(DATASET, "one"),
            ):
                try:
                    client.get_flight_info(descriptor)
                except (flight.FlightError, pa.ArrowException) as exc:
                    assert "Traceback" not in str(exc)
                    found.append(from_flight_error(exc))
            try:
                client.do_get(flight.Ticket(b"")).read_all()
            except (flight.FlightError, pa.ArrowException) as exc:
                found.append(from_flight_error(exc))
        finally:
            client.close()
        return found

    found = await asyncio.to_thread(errors)
    assert [type(e) for e in found] == [NotFound, InvalidArgument, InvalidArgument, InvalidArgument]


async def test_http_and_grpc_error_shapes(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.http, timeout=10) as http:
        unknown_job = await http.get("/v1/jobs/no-such-job")
        unknown_model = await http.get("/v1/models/nope")
        malformed = await http.post(
            "/v1/jobs", content=b'{"dataset": ', headers={"content-type": "application/json"}
        )
        missing = await http.post("/v1/jobs", json={"dataset": DATASET})
        negative = await http.post(
            "/v1/jobs",
            json={"dataset": DATASET, "target": "label", "model": MODEL, "epochs": -1},
        )
        no_route = await http.get("/v1/nothing-here")
    assert unknown_job.status_code == 404 and unknown_job.json()["error"]
    assert unknown_model.status_code == 404 and unknown_model.json()["error"]
    assert malformed.status_code == 400
    assert malformed.json()["error"].startswith("malformed JSON body")
    assert missing.status_code == 400 and "target" in missing.json()["error"]
    assert negative.status_code == 400 and "epochs" in negative.json()["error"]
    assert no_route.status_code == 404 and no_route.json() == {"error": "Not Found"}
    for response in (unknown_job, unknown_model, malformed, missing, negative, no_route):
        assert set(response.json()) == {"error"}
        assert "Traceback" not in response.text

    async with aio_channel(mesh.gateway["grpc"], mesh.settings) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetJob(trainer_pb2.GetJobRequest(job_id="no-such-job"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# --- the HTTP edge alone, over a fake control ----------------------------------------------


class _FailingControl:
    """A control whose every call fails the given way."""

    def __init__(self, error: Exception):
        self.error = error

    async def list_jobs(self) -> list[Any]:
        raise self.error

    async def list_datasets(self) -> list[Any]:
        raise self.error


async def _get(app: Any, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.get(path)


async def test_unexpected_error_is_a_generic_500_with_a_correlation_id(
    settings: Settings,
) -> None:
    from gateway.http import create_app

    app = create_app(
        SimpleNamespace(settings=settings), _FailingControl(RuntimeError("secret /etc/shadow"))
    )
    response = await _get(app, "/v1/jobs")
    assert response.status_code == 500
    assert response.json()["error"].startswith("internal error (correlation id ")
    assert "secret" not in response.text and "Traceback" not in response.text


async def test_unavailable_is_503_with_retry_after(settings: Settings) -> None:
    from gateway.http import create_app

    app = create_app(
        SimpleNamespace(settings=settings), _FailingControl(Unavailable("trainer is down"))
    )
    response = await _get(app, "/v1/datasets")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": "trainer is down"}


async def test_cluster_status_reports_unreachable_services(settings: Settings) -> None:
    from gateway.control import GatewayControl

    # Ports that were bound and released: nothing listens there.
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    settings = settings.model_copy(
        update={
            "trainer_address": f"127.0.0.1:{ports[0]}",
            "shard_address": f"127.0.0.1:{ports[1]}",
        }
    )
    async with aio_channel(settings.trainer_address, settings) as trainer:
        control = GatewayControl(settings, trainer, data_client=None)  # type: ignore[arg-type]
        services = await control.cluster_status()
        with pytest.raises(Unavailable):
            await control.list_jobs()
    assert [(s.name, s.health) for s in services] == [
        ("shard", "UNREACHABLE"),
        ("trainer", "UNREACHABLE"),
    ]


async def test_descriptor_parsing() -> None:
    from gateway.flight import data_request, ingest_request

    assert data_request(flight.FlightDescriptor.for_path("a", "3")).version == 3
    request = data_pb2.DataRequest(dataset="a", columns=["x"])
    parsed = data_request(flight.FlightDescriptor.for_command(request.SerializeToString()))
    assert parsed == request
    for bad in (
        flight.FlightDescriptor.for_path("a", "b", "c"),
        flight.FlightDescriptor.for_path("a", "-1"),
        flight.FlightDescriptor.for_path("../a"),
    ):
        with pytest.raises(InvalidArgument):
            data_request(bad)
    with pytest.raises(InvalidArgument, match="versions are assigned"):
        ingest_request(flight.FlightDescriptor.for_path("a", "1"))
    command = data_pb2.IngestRequest(dataset="a", shards=2, key="id")
    assert ingest_request(flight.FlightDescriptor.for_command(command.SerializeToString())) == (
        command
    )


async def test_start_needs_a_trainer_address(settings: Settings) -> None:
    from gateway.server import start

    with pytest.raises(ValueError, match="ONEHOP_TRAINER_ADDRESS"):
        await start(settings)


async def test_a_second_gateway_serves_then_stops_cleanly(mesh: Mesh) -> None:
    """Health SERVING only once all three fronts listen; stop releases every port."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import gateway.server

    running = await gateway.server.start(mesh.settings)
    async with aio_channel(running.endpoints["grpc"], mesh.settings) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with httpx.AsyncClient(base_url=f"http://{running.endpoints['http']}") as http:
            assert (await http.get("/v1/datasets")).status_code == 200
        await running.stop()
        await running.stop()  # idempotent
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    async with httpx.AsyncClient(base_url=f"http://{running.endpoints['http']}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/v1/datasets")


# --- jobs as events, cancel, versions, promote, cache stats ---------------------------------


async def _events(http: httpx.AsyncClient, job_id: str, on_first: Any = None) -> list[tuple]:
    """(event name, data) of a job's server-sent event stream, until it ends."""
    events: list[tuple[str, dict[str, Any]]] = []
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        name = ""
        async for line in reply.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if len(events) == 1 and on_first is not None:
                    await on_first()
    return events


async def test_job_progress_events_and_cancel(mesh: Mesh) -> None:
    body = {"dataset": DATASET, "target": "label", "model": "long-one", "epochs": 1000}
    async with httpx.AsyncClient(base_url=mesh.http, timeout=60) as http:
        started = await http.post("/v1/jobs", json=body)
        assert started.status_code == 202, started.text
        job_id = started.json()["job_id"]

        async def cancel() -> None:
            reply = await http.post(f"/v1/jobs/{job_id}/cancel")
            assert reply.status_code == 200, reply.text
            assert reply.json()["job_id"] == job_id

        events = await _events(http, job_id, on_first=cancel)
        assert events[-1][0] == "end"
        assert events[-1][1]["state"] == "JOB_STATE_CANCELLED"
        assert all(name == "progress" for name, _ in events[:-1])
        assert (await http.get(f"/v1/jobs/{job_id}")).json()["state"] == "JOB_STATE_CANCELLED"
        assert (await http.get("/v1/jobs/no-such-job/events")).status_code == 404
        assert (await http.post("/v1/jobs/no-such-job/cancel")).status_code == 404


async def test_model_versions_promote_and_cache_stats(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.http, timeout=60) as http:
        versions = (await http.get(f"/v1/models/{MODEL}/versions")).json()
        assert versions["name"] == MODEL and versions["versions"]
        first = versions["versions"][0]
        promoted = await http.post(f"/v1/models/{MODEL}/promote", json={"version": first})
        assert promoted.status_code == 200, promoted.text
        after = (await http.get(f"/v1/models/{MODEL}/versions")).json()
        assert after["serving_version"] == first
        missing = await http.post(f"/v1/models/{MODEL}/promote", json={"version": 999})
        assert missing.status_code == 404 and missing.json()["error"]
        bad = await http.post(f"/v1/models/{MODEL}/promote", json={"version": 0})
        assert bad.status_code == 400 and bad.json()["error"]

        stats = await http.get("/v1/cache/stats")
        assert stats.status_code == 200, stats.text
        assert stats.json()["capacity_bytes"] > 0 and "namespaces" in stats.json()

    # The same over onehop.v1.Gateway.
    async with aio_channel(mesh.gateway["grpc"], mesh.settings) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        info = await stub.PromoteModel(
            trainer_pb2.PromoteModelRequest(name=MODEL, version=first), timeout=10
        )
        assert info.serving_version == first
        cache = await stub.GetCacheStats(cache_pb2.GetStatsRequest(), timeout=10)
        assert cache.capacity_bytes > 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CancelJob(trainer_pb2.CancelJobRequest(job_id="no-such-job"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_declared_oversized_body_is_413_before_it_is_read(mesh: Mesh) -> None:
    """A Content-Length over the limit is answered without reading a byte of the body."""
    host, port = mesh.gateway["http"].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {mesh.settings.max_message_bytes + 1}\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413"), head
    finally:
        writer.close()


# --- fuzzing: the OpenAPI with schemathesis, the gRPC methods with random bytes -----------


async def test_schemathesis_finds_no_server_errors(mesh: Mesh, tmp_path: Path) -> None:
    """Every documented route, with generated valid and invalid input: never a 5xx."""
    import sys

    schemathesis = Path(sys.executable).with_name("schemathesis")
    process = await asyncio.create_subprocess_exec(
        str(schemathesis),
        "run",
        f"{mesh.http}/openapi.json",
        "--checks=not_a_server_error",
        "--generation-database=none",
        "--max-examples=15",
        "--seed=1",
        "--phases=examples,coverage,fuzzing",
        "--request-timeout=20",
        # A started job would train for real: its route is covered by the tests above.
        "--exclude-name=POST /v1/jobs",
        "--include-path-regex=^/v[12]",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # its cache directory goes there, not into the checkout
    )
    output, _ = await asyncio.wait_for(process.communicate(), 100)
    assert process.returncode == 0, output.decode()[-4000:]


def _fuzz_grpc(address: str, settings: Settings) -> int:
    """Random bytes as the request of every gateway gRPC method (OIP and onehop.v1.Gateway):
    the answer is a status from the table, never INTERNAL or UNKNOWN. Returns calls made."""
    from hypothesis import HealthCheck, given
    from hypothesis import settings as run_with
    from hypothesis import strategies as st

    from onehop.channels import sync_channel
    from protos.inference import grpc_service_pb2

    services = [
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
    ]
    channel = sync_channel(address, settings)
    # No serializers: the bytes go out exactly as generated.
    methods = [
        (
            f"/{service.full_name}/{method.name}",
            channel.unary_stream(f"/{service.full_name}/{method.name}")
            if method.server_streaming
            else channel.unary_unary(f"/{service.full_name}/{method.name}"),
            method.server_streaming,
        )
        for service in services
        for method in service.methods
    ]
    calls = 0
    # Bytes no protobuf parser accepts (a truncated length-delimited field): INVALID_ARGUMENT.
    with pytest.raises(grpc.RpcError) as garbage:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\x0a\xff", timeout=10)
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    @run_with(
        max_examples=400,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(index=st.integers(0, len(methods) - 1), data=st.binary(max_size=200))
    def check(index: int, data: bytes) -> None:
        nonlocal calls
        path, call, streaming = methods[index]
        calls += 1
        try:
            if streaming:
                for _ in call(data, timeout=10):
                    break  # a stream that starts answered; enough
            else:
                call(data, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                path,
                data,
                exc.details(),
            )

    try:
        check()
    finally:
        channel.close()
    return calls


async def test_random_bytes_to_every_grpc_method_get_table_codes(mesh: Mesh) -> None:
    calls = await asyncio.to_thread(_fuzz_grpc, mesh.gateway["grpc"], mesh.settings)
    assert calls >= 400
