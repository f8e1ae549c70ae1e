"""TLS, mTLS and the bearer token, from settings, on real services (port 0) with throwaway
certificates (trustme): the cache service's gRPC alone, then the whole mesh in-process with
mTLS and a token on every service, reached over HTTPS and gRPC."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onehop.channels import aio_channel
from onehop.server import Running
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, gateway_pb2_grpc, trainer_pb2

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

TOKEN = "s3cret-token"


@dataclass
class Pki:
    ca: Path  # the CA every onehop process trusts
    cert: Path  # a certificate for 127.0.0.1 signed by it (server and client)
    key: Path
    other_ca: Path  # a CA nobody trusts
    other_cert: Path  # signed by other_ca
    other_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    paths: dict[str, Path] = {}
    for prefix, ca in (("", trustme.CA()), ("other_", trustme.CA())):
        issued = ca.issue_cert("127.0.0.1", "localhost")
        for name, blob in (
            ("ca", ca.cert_pem),
            ("cert", issued.cert_chain_pems[0]),
            ("key", issued.private_key_pem),
        ):
            paths[prefix + name] = root / f"{prefix}{name}.pem"
            blob.write_to_path(str(paths[prefix + name]))
    return Pki(**paths)


def tls(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update=update)


async def cache_stats(address: str, settings: Settings) -> cache_pb2.GetStatsResponse:
    channel = aio_channel(address, settings)
    try:
        stub = cache_pb2_grpc.CacheStub(channel)
        return await stub.GetStats(cache_pb2.GetStatsRequest(), timeout=5)
    finally:
        await channel.close()


async def refused_code(address: str, settings: Settings) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cache_stats(address, settings)
    return caught.value.code()


@pytest_asyncio.fixture(loop_scope="module")
async def started() -> AsyncIterator[list[Running]]:
    running: list[Running] = []
    yield running
    for service in reversed(running):
        await service.stop()


async def start_cache(settings: Settings, started: list[Running]) -> str:
    import cache_service.server

    cache = await cache_service.server.start(settings)
    started.append(cache)
    return cache.endpoints["grpc"]


async def test_tls_server_is_reached_only_by_clients_that_trust_its_ca(
    settings: Settings, pki: Pki, started: list[Running]
) -> None:
    server = tls(settings, tls_cert_file=str(pki.cert), tls_key_file=str(pki.key))
    address = await start_cache(server, started)
    trusting = tls(settings, tls_ca_file=str(pki.ca))
    assert (await cache_stats(address, trusting)).capacity_bytes > 0
    # Plaintext to a TLS port, and TLS that trusts another CA: no connection.
    assert await refused_code(address, settings) == grpc.StatusCode.UNAVAILABLE
    untrusting = tls(settings, tls_ca_file=str(pki.other_ca))
    assert await refused_code(address, untrusting) == grpc.StatusCode.UNAVAILABLE
    # The launcher's probe (`onehop up`, `onehop status`) speaks TLS when told to.
    from onehop.launcher import health_status

    assert await asyncio.to_thread(health_status, address, 5, trusting) == "SERVING"
    assert await asyncio.to_thread(health_status, address, 5) == "UNREACHABLE"


async def test_mtls_needs_a_client_certificate_from_the_trusted_ca(
    settings: Settings, pki: Pki, started: list[Running]
) -> None:
    server = tls(
        settings,
        tls_cert_file=str(pki.cert),
        tls_key_file=str(pki.key),
        tls_ca_file=str(pki.ca),
        tls_client_auth=True,
    )
    address = await start_cache(server, started)
    no_cert = tls(settings, tls_ca_file=str(pki.ca))
    assert await refused_code(address, no_cert) == grpc.StatusCode.UNAVAILABLE
    foreign_cert = tls(
        settings,
        tls_ca_file=str(pki.ca),
        tls_cert_file=str(pki.other_cert),
        tls_key_file=str(pki.other_key),
    )
    assert await refused_code(address, foreign_cert) == grpc.StatusCode.UNAVAILABLE
    assert (await cache_stats(address, server)).capacity_bytes > 0


async def test_bearer_token_on_grpc_with_health_open(
    settings: Settings, started: list[Running]
) -> None:
    address = await start_cache(tls(settings, auth_token=TOKEN), started)
    assert await refused_code(address, settings) == grpc.StatusCode.UNAUTHENTICATED
    wrong = tls(settings, auth_token="not-it")
    assert await refused_code(address, wrong) == grpc.StatusCode.UNAUTHENTICATED
    assert (await cache_stats(address, tls(settings, auth_token=TOKEN))).capacity_bytes > 0
    channel = aio_channel(address, settings)  # no token: probes must still work
    try:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()


async def test_plaintext_health_port_for_probes_beside_a_tls_port(
    settings: Settings,
    pki: Pki,
    started: list[Running],
    free_ports: Callable[[int], list[int]],
) -> None:
    from onehop.launcher import health_status

    (probe_port,) = free_ports(1)
    server = tls(
        settings,
        tls_cert_file=str(pki.cert),
        tls_key_file=str(pki.key),
        auth_token=TOKEN,
        health_port=probe_port,
    )
    address = await start_cache(server, started)
    # Kubernetes' gRPC probe: plaintext, no token, on its own port; the service port stays TLS.
    probe = f"{settings.host}:{probe_port}"
    assert await asyncio.to_thread(health_status, probe, 5) == "SERVING"
    assert await refused_code(address, settings) == grpc.StatusCode.UNAVAILABLE
    # Only health answers on the probe port.
    channel = aio_channel(probe, settings)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cache_pb2_grpc.CacheStub(channel).GetStats(cache_pb2.GetStatsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await channel.close()


# --- the whole mesh under mTLS and a token ------------------------------------------------


@dataclass
class SecureMesh:
    settings: Settings
    gateway: dict[str, str]
    pki: Pki


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def secure_mesh(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, inner_services: Any
) -> AsyncIterator[SecureMesh]:
    import gateway.server

    root = tmp_path_factory.mktemp("secure")
    settings = Settings(
        data_dir=root / "data",
        gateway_http_port=0,
        gateway_grpc_port=0,
        gateway_flight_port=0,
        grace_seconds=0.2,
        cache_size_bytes=64 << 20,
        auth_token=TOKEN,
        tls_cert_file=str(pki.cert),
        tls_key_file=str(pki.key),
        tls_ca_file=str(pki.ca),
        tls_client_auth=True,
    )
    started: list[Running] = []
    try:
        settings = await inner_services(settings, started)
        gw = await gateway.server.start(settings)
        started.append(gw)
        yield SecureMesh(settings, gw.endpoints, pki)
    finally:
        for service in reversed(started):
            await service.stop()


def https(mesh: SecureMesh, cert: bool = True, token: str | None = TOKEN) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(mesh.pki.ca))
    if cert:
        context.load_cert_chain(str(mesh.pki.cert), str(mesh.pki.key))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        base_url=f"https://{mesh.gateway['http']}", verify=context, headers=headers, timeout=10
    )


async def test_https_with_client_certificate_and_token(secure_mesh: SecureMesh) -> None:
    async with https(secure_mesh) as client:
        reply = await client.get("/v1/models")
        assert reply.status_code == 200, reply.text
        # The gateway reached the trainer over mTLS with the token: the call went through.
        assert reply.json() == {"models": []}
        cluster = (await client.get("/v1/cluster")).json()["services"]
        assert {s["name"]: s["health"] for s in cluster}["trainer"] == "SERVING"


async def test_https_without_token_is_401_and_health_stays_open(
    secure_mesh: SecureMesh,
) -> None:
    for token in (None, "not-it"):
        async with https(secure_mesh, token=token) as client:
            reply = await client.get("/v1/models")
            assert reply.status_code == 401
            assert reply.headers["www-authenticate"] == "Bearer"
            assert "token" in reply.json()["error"]
            assert (await client.get("/v2/health/live")).status_code == 200


async def test_dashboard_page_is_open_and_its_data_needs_the_token(
    secure_mesh: SecureMesh,
) -> None:
    async with https(secure_mesh, token=None) as client:
        page = await client.get("/ui/")
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        assert (await client.get("/v1/cluster")).status_code == 401
        assert (await client.get("/uix")).status_code == 401


async def test_https_without_client_certificate_is_refused(secure_mesh: SecureMesh) -> None:
    async with https(secure_mesh, cert=False) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/v2/health/live")


async def test_gateway_grpc_needs_the_token(secure_mesh: SecureMesh) -> None:
    no_token = secure_mesh.settings.model_copy(update={"auth_token": ""})
    for settings, ok in ((no_token, False), (secure_mesh.settings, True)):
        channel = aio_channel(secure_mesh.gateway["grpc"], settings)
        try:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call = stub.ListModels(trainer_pb2.ListModelsRequest(), timeout=5)
            if ok:
                assert list((await call).models) == []
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await channel.close()


async def test_reflection_is_off_by_default(secure_mesh: SecureMesh) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = aio_channel(secure_mesh.gateway["grpc"], secure_mesh.settings)
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.ServerReflectionInfo(iter([request]), timeout=5):
                pass
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await channel.close()


async def test_the_cli_client_speaks_tls_and_sends_the_token(secure_mesh: SecureMesh) -> None:
    import numpy as np

    from onehop.client import GatewayClient
    from onehop.errors import NotFound
    from onehop.server import announce

    announce(secure_mesh.settings, "gateway", secure_mesh.gateway)

    def use() -> None:
        with GatewayClient(secure_mesh.settings, timeout=10) as client:
            assert client.models() == []  # gRPC over mTLS with the token
            with pytest.raises(NotFound):  # HTTPS with the token: the bridge answered 404
                client.predict("ghost", np.zeros((1, 3), dtype=np.float32))

    await asyncio.to_thread(use)


async def test_flight_helpers_give_tls_mtls_and_the_token(pki: Pki, settings: Settings) -> None:
    """The Flight side of the shared runtime: a server built with `flight_server_options`
    over mTLS with a token, read by `flight_client` (what every Flight client uses)."""
    await asyncio.to_thread(_flight_round_trips, pki, settings)


def _flight_round_trips(pki: Pki, settings: Settings) -> None:
    import pyarrow as pa
    import pyarrow.flight as flight

    from onehop.channels import flight_location
    from onehop.dataplane import flight_client
    from onehop.server import flight_server_options

    secure = settings.model_copy(
        update={
            "auth_token": TOKEN,
            "tls_cert_file": str(pki.cert),
            "tls_key_file": str(pki.key),
            "tls_ca_file": str(pki.ca),
            "tls_client_auth": True,
        }
    )
    table = pa.table({"x": [1, 2, 3]})

    class Server(flight.FlightServerBase):  # type: ignore[misc]
        def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
            return flight.RecordBatchStream(table)

    server = Server(flight_location("127.0.0.1:0", secure), **flight_server_options(secure))
    address = f"127.0.0.1:{server.port}"
    try:

        def read(client_settings: Settings) -> pa.Table:
            client = flight_client(flight_location(address, client_settings), client_settings)
            try:
                options = flight.FlightCallOptions(timeout=5)
                return client.do_get(flight.Ticket(b"t"), options).read_all()
            finally:
                client.close()

        assert read(secure) == table
        with pytest.raises(flight.FlightUnauthenticatedError):
            read(secure.model_copy(update={"auth_token": "not-it"}))
        with pytest.raises(flight.FlightError):  # no client certificate: no handshake
            read(secure.model_copy(update={"tls_cert_file": "", "tls_key_file": ""}))
    finally:
        server.shutdown()


# --- the data plane (Arrow Flight) under mTLS and a token -----------------------------------


def _flight_ports(mesh: SecureMesh) -> dict[str, str]:
    return {
        "gateway": mesh.gateway["flight"],
        "shard": mesh.settings.shard_address,
        "cache": mesh.settings.cache_flight_address,
    }


async def test_a_dataset_moves_through_the_mesh_over_mtls_with_the_token(
    secure_mesh: SecureMesh,
) -> None:
    await asyncio.to_thread(_ingest_plan_read, secure_mesh)


def _ingest_plan_read(mesh: SecureMesh) -> None:
    import time

    import pyarrow as pa
    import pyarrow.flight as flight

    from onehop.channels import flight_location
    from onehop.dataplane import flight_client, put_dataset
    from protos.onehop.v1 import data_pb2

    settings = mesh.settings
    table = pa.table({"id": pa.array(range(600), pa.int64()), "x": [0.5] * 600})
    gateway = flight_location(mesh.gateway["flight"], settings)
    assert gateway.startswith("grpc+tls://")
    with flight_client(gateway, settings) as client:
        assert put_dataset(client, "secure", table, shards=3).rows == 600
        descriptor = flight.FlightDescriptor.for_path("secure")

        def read(info: flight.FlightInfo) -> tuple[list[int], list[int], set[str]]:
            proxied = [client.do_get(e.ticket).read_all() for e in info.endpoints]
            direct = []
            for endpoint in info.endpoints:
                with flight_client(endpoint.locations[0], settings) as inner:
                    direct.append(inner.do_get(endpoint.ticket).read_all())
            return (
                sorted(i for t in proxied for i in t.column("id").to_pylist()),
                sorted(i for t in direct for i in t.column("id").to_pylist()),
                {e.locations[0].uri.decode() for e in info.endpoints},
            )

        proxied, direct, first = read(client.get_flight_info(descriptor))
        assert proxied == direct == list(range(600))
        assert first == {flight_location(settings.shard_address, settings)}
        assert all(uri.startswith("grpc+tls://") for uri in first)

        # The reads wrote the shards through to the cache over mTLS with the token: the plan
        # turns cache-first (polled, bounded).
        cache = flight_location(settings.cache_flight_address, settings)
        deadline = time.monotonic() + 10
        info = client.get_flight_info(descriptor)
        while {e.locations[0].uri.decode() for e in info.endpoints} != {cache}:
            assert time.monotonic() < deadline, "the write-through never reached the cache"
            time.sleep(0.05)
            info = client.get_flight_info(descriptor)
        proxied, direct, first = read(info)
        assert proxied == direct == list(range(600)) and first == {cache}
        request = data_pb2.DataRequest(dataset="secure")
        assert (
            client.get_flight_info(
                flight.FlightDescriptor.for_command(request.SerializeToString())
            ).total_records
            == 600
        )


async def test_every_flight_port_needs_the_token_and_a_client_certificate(
    secure_mesh: SecureMesh,
) -> None:
    await asyncio.to_thread(_refused_on_every_flight_port, secure_mesh)


def _refused_on_every_flight_port(mesh: SecureMesh) -> None:
    import pyarrow.flight as flight

    from onehop.channels import flight_location
    from onehop.dataplane import flight_client
    from onehop.launcher import health_status

    no_token = mesh.settings.model_copy(update={"auth_token": ""})
    wrong_token = mesh.settings.model_copy(update={"auth_token": "not-it"})
    no_cert = mesh.settings.model_copy(update={"tls_cert_file": "", "tls_key_file": ""})
    options = flight.FlightCallOptions(timeout=5)
    for service, address in _flight_ports(mesh).items():
        for settings in (no_token, wrong_token):
            with flight_client(flight_location(address, settings), settings) as client:
                with pytest.raises(flight.FlightUnauthenticatedError):
                    client.do_get(flight.Ticket(b"x"), options).read_all()
                with pytest.raises(flight.FlightUnauthenticatedError):
                    list(client.list_actions(options))
        with flight_client(flight_location(address, no_cert), no_cert) as client:
            with pytest.raises(flight.FlightError) as caught:  # no handshake at all
                list(client.list_actions(options))
            assert not isinstance(caught.value, flight.FlightUnauthenticatedError), service
        # The right token and certificate get an answer.
        with flight_client(flight_location(address, mesh.settings), mesh.settings) as client:
            assert list(client.list_actions(options)), service
    # Probes need no token: the shard service's health answers over mTLS without one.
    assert health_status(mesh.settings.shard_health_address, 5, no_token) == "SERVING"
