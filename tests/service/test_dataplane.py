"""DataClient against a real cache and a real shard service (in-process, port 0): plans put
cached shards first once a read wrote them through, and reads fall back past a cache that
lost an entry or is down; and the gateway's Flight front over them, used by a stock
pyarrow.flight client in its own process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from cache_service.server import start as start_cache
from gateway.control import GatewayControl
from gateway.flight import GatewayFlightServer
from gateway.http import create_app
from onehop.channels import aio_channel, flight_location, sync_channel
from onehop.dataplane import DataClient, put_dataset
from onehop.errors import InvalidArgument, NotFound, Unavailable, from_flight_error
from onehop.keys import shard_key
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, data_pb2
from shard_service.server import start as start_shard

pytestmark = pytest.mark.timeout(60)


@dataclass
class Mesh:
    settings: Settings  # what a DataClient of this mesh is configured with
    cache: cache_pb2_grpc.CacheStub

    def stats(self) -> cache_pb2.NamespaceStats:
        return self.cache.GetStats(cache_pb2.GetStatsRequest(), timeout=5).namespaces["shard"]

    def wait_cached(self, keys: list[bytes], timeout: float = 10.0) -> None:
        """Poll Contains (bounded) until the write-through has landed."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            found = self.cache.Contains(cache_pb2.ContainsRequest(keys=keys), timeout=5).found
            if all(found):
                return
            assert time.monotonic() < deadline, f"not cached after {timeout}s: {list(found)}"
            threading.Event().wait(pause)
            pause = min(pause * 2, 0.1)


@pytest.fixture
def mesh(settings: Settings) -> Iterator[Mesh]:
    """Cache then shard service on their own event loop thread, so tests use sync clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mesh-loop", daemon=True)
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    cache = run(start_cache(settings))
    shard_settings = settings.model_copy(
        update={
            "cache_address": cache.endpoints["grpc"],
            "cache_flight_address": cache.endpoints["flight"],
            "default_shards": 4,
        }
    )
    shard = None
    try:
        shard = run(start_shard(shard_settings))
        client_settings = shard_settings.model_copy(
            update={"shard_address": shard.endpoints["flight"]}
        )
        with sync_channel(cache.endpoints["grpc"], settings) as channel:
            yield Mesh(client_settings, cache_pb2_grpc.CacheStub(channel))
    finally:
        if shard is not None:
            run(shard.stop())
        run(cache.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def client(mesh: Mesh) -> Iterator[DataClient]:
    with DataClient(mesh.settings) as client:
        yield client


def make_table(rows: int = 1200, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": pa.array(np.arange(rows), pa.int64()),
            "x": rng.normal(size=rows),
            "label": pa.array(rng.integers(0, 2, rows), pa.int8()),
        }
    )


def locations(endpoint: flight.FlightEndpoint) -> list[str]:
    return [location.uri.decode() for location in endpoint.locations]


def keys_of(plan: flight.FlightInfo) -> list[bytes]:
    return [shard_key(data_pb2.ShardTicket.FromString(e.ticket.ticket)) for e in plan.endpoints]


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_ingest_describe_and_list(client: DataClient) -> None:
    table = make_table()
    info = client.ingest("loans", table, shards=3)
    assert (info.name, info.version, info.rows, len(info.shards)) == ("loans", 1, 1200, 3)
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=100))
    assert client.ingest("loans", reader, key="id").version == 2
    batches = iter(table.slice(0, 10).to_batches())
    assert client.ingest("loans", batches, table.schema).rows == 10

    described = client.describe("loans", 2)
    assert (described.version, described.rows, list(described.versions)) == (2, 1200, [1, 2, 3])
    assert client.describe("loans").version == 3
    assert [(d.name, d.version) for d in client.list_datasets()] == [("loans", 3)]

    with pytest.raises(NotFound, match="no dataset 'other'"):
        client.describe("other")
    with pytest.raises(InvalidArgument, match="no rows"):
        client.ingest("empty", pa.table({"x": pa.array([], pa.float64())}))
    with pytest.raises(InvalidArgument, match="invalid dataset name"):
        client.ingest("a/b", table)
    assert [d.name for d in client.list_datasets()] == ["loans"]


def test_a_source_failing_mid_ingest_publishes_nothing(client: DataClient) -> None:
    table = make_table()

    def source():
        yield from table.to_batches(max_chunksize=500)[:2]
        raise pa.ArrowInvalid("CSV parse error: Expected 3 columns, got 1")

    with pytest.raises(pa.ArrowInvalid, match="CSV parse error"):  # the source's own error
        client.ingest("loans", source(), table.schema)
    assert client.list_datasets() == []
    assert client.ingest("loans", table).version == 1


def test_plan_puts_the_cache_first_after_a_write_through(client: DataClient, mesh: Mesh) -> None:
    table = make_table()
    client.ingest("loans", table)
    request = data_pb2.DataRequest(
        dataset="loans",
        shuffle=True,
        seed=11,
        epoch=1,
        preprocess=data_pb2.Preprocessing(scaling=data_pb2.SCALING_STANDARD, passthrough=["id"]),
    )
    shard_location = flight_location(mesh.settings.shard_address)
    cache_location = flight_location(mesh.settings.cache_flight_address)

    cold = client.plan(request)
    assert len(cold.endpoints) == 4 and cold.total_records == 1200
    assert all(locations(e) == [shard_location] for e in cold.endpoints)
    from_shard = [client.read(e) for e in cold.endpoints]
    assert sorted(pa.concat_tables(from_shard).column("id").to_pylist()) == list(range(1200))

    mesh.wait_cached(keys_of(cold))
    hits_before = mesh.stats().hits
    warm = client.plan(request)
    assert [e.ticket for e in warm.endpoints] == [e.ticket for e in cold.endpoints]
    assert all(locations(e) == [cache_location, shard_location] for e in warm.endpoints)
    from_cache = [client.read(e) for e in warm.endpoints]
    assert mesh.stats().hits == hits_before + 4  # served by the cache, not the shard service
    # The cache arranges (shuffle by seed and epoch) exactly as the shard service does.
    assert all(c.equals(s) for c, s in zip(from_cache, from_shard, strict=True))

    # Another epoch reuses the same cached entries: the key ignores shuffle order.
    next_epoch = data_pb2.DataRequest()
    next_epoch.CopyFrom(request)
    next_epoch.epoch = 2
    assert all(locations(e)[0] == cache_location for e in client.plan(next_epoch).endpoints)


def test_read_falls_back_when_the_cache_lost_an_entry(client: DataClient, mesh: Mesh) -> None:
    client.ingest("loans", make_table())
    request = data_pb2.DataRequest(dataset="loans", columns=["id", "x"])
    cold = client.plan(request)
    expected = [client.read(e) for e in cold.endpoints]
    mesh.wait_cached(keys_of(cold))
    warm = client.plan(request)
    lost = keys_of(warm)[0]
    deleted = mesh.cache.Delete(cache_pb2.DeleteRequest(keys=[lost]), timeout=5).deleted
    assert deleted == 1

    misses_before = mesh.stats().misses
    assert locations(warm.endpoints[0])[0] == flight_location(mesh.settings.cache_flight_address)
    assert client.read(warm.endpoints[0]).equals(expected[0])  # via the shard service
    assert mesh.stats().misses > misses_before  # the cache was asked first and said no
    # A bare ticket is planned alone: one Contains, the cache first when it holds the shard.
    bare = client.endpoint_for(warm.endpoints[1].ticket.ticket)
    assert locations(bare) == locations(warm.endpoints[1])
    assert client.read(bare).equals(expected[1])
    # The fallback read wrote the shard through again.
    mesh.wait_cached([lost])


def test_all_locations_failing_raises_the_domain_error(client: DataClient) -> None:
    ticket = data_pb2.ShardTicket(dataset="missing", version=1).SerializeToString()
    with pytest.raises(NotFound, match="no dataset 'missing'"):
        client.read(client.endpoint_for(ticket))
    with pytest.raises(NotFound):
        client.plan(data_pb2.DataRequest(dataset="missing"))
    client.ingest("loans", make_table(rows=10))
    with pytest.raises(InvalidArgument, match="no column 'nope'"):
        client.plan(data_pb2.DataRequest(dataset="loans", columns=["nope"]))


def test_a_cache_that_is_down_is_a_miss(mesh: Mesh) -> None:
    with DataClient(mesh.settings) as writer:
        writer.ingest("loans", make_table(rows=100))
    settings = mesh.settings.model_copy(
        update={"cache_address": dead_address(), "cache_flight_address": dead_address()}
    )
    with DataClient(settings) as client:
        plan = client.plan(data_pb2.DataRequest(dataset="loans"))
        shard_location = flight_location(settings.shard_address)
        assert all(locations(e) == [shard_location] for e in plan.endpoints)
        # A location that is down is skipped for the next one.
        dead = flight.Location(flight_location(settings.cache_flight_address))
        rows = sum(
            client.read(flight.FlightEndpoint(e.ticket, [dead, shard_location])).num_rows
            for e in plan.endpoints
        )
        assert rows == 100


def test_no_cache_configured(mesh: Mesh) -> None:
    settings = mesh.settings.model_copy(update={"cache_address": "", "cache_flight_address": ""})
    with DataClient(settings) as client:
        client.ingest("plain", make_table(rows=50))
        plan = client.plan(data_pb2.DataRequest(dataset="plain"))
        assert all(len(e.locations) == 1 for e in plan.endpoints)
        assert sum(client.read(e).num_rows for e in plan.endpoints) == 50


def test_without_a_shard_address_calls_are_unavailable(settings: Settings) -> None:
    with DataClient(settings) as client, pytest.raises(Unavailable, match="SHARD_ADDRESS"):
        client.list_datasets()


# --- the gateway's Flight front ---------------------------------------------------------------

# A client with nothing but pyarrow: lists, plans and reads through the gateway, then reads
# the same plan directly at each endpoint's first location.
STOCK_CLIENT = """
import json, sys
import pyarrow.flight as flight
client = flight.connect("grpc+tcp://" + sys.argv[1])
listed = [(i.descriptor.path[0].decode(), i.total_records) for i in client.list_flights()]
info = client.get_flight_info(flight.FlightDescriptor.for_path("loans"))
proxied = [client.do_get(e.ticket).read_all() for e in info.endpoints]
direct = [flight.connect(e.locations[0]).do_get(e.ticket).read_all() for e in info.endpoints]
ids = sorted(i for t in proxied for i in t.column("id").to_pylist())
print(json.dumps({
    "listed": listed,
    "records": info.total_records,
    "bytes": info.total_bytes,
    "schema": info.schema.names,
    "endpoints": len(info.endpoints),
    "ids": ids,
    "same": all(p.equals(d) for p, d in zip(proxied, direct)),
    "first": [e.locations[0].uri.decode() for e in info.endpoints],
}))
"""


@pytest.fixture
def gateway(mesh: Mesh) -> Iterator[str]:
    settings = mesh.settings.model_copy(update={"gateway_flight_port": 0})
    with DataClient(settings) as data, GatewayFlightServer(settings, data) as server:
        yield f"127.0.0.1:{server.port}"


def stock_client(gateway: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", STOCK_CLIENT, gateway], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_stock_flight_client_lists_plans_and_reads_through_the_gateway(
    gateway: str, mesh: Mesh
) -> None:
    table = make_table()
    with flight.connect(f"grpc+tcp://{gateway}") as client:
        info = put_dataset(client, "loans", table)  # DoPut through the gateway
    assert info.rows == 1200

    cold = stock_client(gateway)
    assert cold["listed"] == [["loans", 1200]]
    assert (cold["records"], cold["bytes"]) == (1200, 1200 * (8 + 8 + 1))
    assert cold["schema"] == ["id", "x", "label"] and cold["endpoints"] == 4
    assert cold["ids"] == list(range(1200)) and cold["same"]
    shard = flight_location(mesh.settings.shard_address)
    assert set(cold["first"]) == {shard}

    with DataClient(mesh.settings) as client:
        keys = keys_of(client.plan(data_pb2.DataRequest(dataset="loans")))
    mesh.wait_cached(keys)  # the reads above wrote the shards through
    hits_before = mesh.stats().hits
    warm = stock_client(gateway)
    assert set(warm["first"]) == {flight_location(mesh.settings.cache_flight_address)}
    assert warm["ids"] == list(range(1200)) and warm["same"]
    # Proxied and direct reads were both served by the cache.
    assert mesh.stats().hits >= hits_before + 8


def test_gateway_actions_and_errors(gateway: str, mesh: Mesh) -> None:
    source = mesh.settings.data_dir / "loans.csv"
    pacsv.write_csv(make_table(rows=30), source)
    with flight.connect(f"grpc+tcp://{gateway}") as client:
        assert {a.type for a in client.list_actions()} == {"describe", "list-datasets", "ingest"}
        body = data_pb2.IngestRequest(dataset="csv", source="loans.csv").SerializeToString()
        (result,) = list(client.do_action(flight.Action("ingest", body)))
        assert data_pb2.DatasetInfo.FromString(result.body.to_pybytes()).rows == 30
        for call, expected in [
            (lambda: client.do_get(flight.Ticket(b"")).read_all(), InvalidArgument),
            (lambda: client.do_get(flight.Ticket(b"\xff garbage")).read_all(), InvalidArgument),
            (
                lambda: client.do_get(
                    flight.Ticket(data_pb2.ShardTicket(dataset="nope").SerializeToString())
                ).read_all(),
                NotFound,
            ),
            (lambda: list(client.do_action(flight.Action("drop", b""))), InvalidArgument),
        ]:
            with pytest.raises((flight.FlightError, pa.ArrowException)) as caught:
                call()
            assert isinstance(from_flight_error(caught.value), expected), str(caught.value)
            assert "Traceback" not in str(caught.value)


async def test_http_upload_streams_a_file_into_a_new_version(mesh: Mesh, tmp_path) -> None:
    table = make_table(rows=500)
    csv_path = tmp_path / "loans.csv"
    pacsv.write_csv(table, csv_path)
    parquet = tmp_path / "loans.parquet"
    pq.write_table(table, parquet)
    with DataClient(mesh.settings) as data:
        channel = aio_channel(dead_address(), mesh.settings)  # no trainer needed here
        control = GatewayControl(mesh.settings, channel, data)
        app = create_app(SimpleNamespace(settings=mesh.settings), control)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            reply = await http.post(
                "/v1/datasets", params={"name": "loans", "shards": 2}, content=csv_path.read_bytes()
            )
            assert reply.status_code == 201, reply.text
            assert (reply.json()["version"], reply.json()["rows"]) == (1, 500)
            reply = await http.post(
                "/v1/datasets",
                params={"name": "loans", "format": "parquet"},
                content=parquet.read_bytes(),
            )
            assert reply.status_code == 201 and reply.json()["version"] == 2

            bad = [
                ({"name": "loans"}, b"a,b\n1,2\n3\n", "Row #3"),
                ({"name": "loans", "format": "parquet"}, b"not parquet", "not a readable parquet"),
                ({"name": "../x"}, b"a\n1\n", "invalid dataset name"),
                ({"name": "loans"}, b"", "body is empty"),
            ]
            for params, body, message in bad:
                reply = await http.post("/v1/datasets", params=params, content=body)
                assert reply.status_code == 400 and message in reply.json()["error"], reply.text
        await channel.close()
        assert [(d.name, d.version) for d in data.list_datasets()] == [("loans", 2)]


# --- several cache nodes ----------------------------------------------------------------------


@pytest.fixture
def two_caches(settings: Settings) -> Iterator[tuple[Settings, list, Callable]]:
    """Two real cache servers and a shard service writing through to both, placed by
    rendezvous hashing; yields the client settings, the caches and `run` (on their loop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="caches-loop", daemon=True)
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    caches: list = []
    shard = None
    try:
        for name in ("a", "b"):
            node = settings.model_copy(update={"data_dir": settings.data_dir / name})
            caches.append(run(start_cache(node)))
        wired = settings.model_copy(
            update={
                "cache_address": ",".join(c.endpoints["grpc"] for c in caches),
                "cache_flight_address": ", ".join(c.endpoints["flight"] for c in caches),
                "default_shards": 8,
            }
        )
        shard = run(start_shard(wired))
        yield wired.model_copy(update={"shard_address": shard.endpoints["flight"]}), caches, run
    finally:
        if shard is not None:
            run(shard.stop())
        for cache in caches:
            run(cache.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_several_cache_nodes_share_the_shards_by_placement(two_caches) -> None:
    from cache_service.client import node_for

    settings, caches, run = two_caches
    names = [c.endpoints["grpc"] for c in caches]
    flights = {c.endpoints["grpc"]: flight_location(c.endpoints["flight"]) for c in caches}
    shard_location = flight_location(settings.shard_address)
    with DataClient(settings) as client:
        client.ingest("loans", make_table(rows=800))
        request = data_pb2.DataRequest(dataset="loans")
        cold = client.plan(request)
        assert all(locations(e) == [shard_location] for e in cold.endpoints)
        assert sum(client.read(e).num_rows for e in cold.endpoints) == 800

        # Each shard was written through to the node that placement gives its key, only there.
        keys = keys_of(cold)
        placed = {key: node_for(key, names) for key in keys}
        assert set(placed.values()) == set(names), "8 shards over 2 nodes: both hold some"
        channels = [sync_channel(name, settings) for name in names]
        stubs = {
            name: cache_pb2_grpc.CacheStub(ch) for name, ch in zip(names, channels, strict=True)
        }

        def held(name: str) -> list[bool]:
            reply = stubs[name].Contains(cache_pb2.ContainsRequest(keys=keys), timeout=5)
            return list(reply.found)

        deadline = time.monotonic() + 10
        while [held(name) for name in names] != [[placed[k] == n for k in keys] for n in names]:
            assert time.monotonic() < deadline, [held(name) for name in names]
            time.sleep(0.02)

        # The plan puts each shard's own node first, the shard service after it.
        warm = client.plan(request)
        for endpoint, key in zip(warm.endpoints, keys_of(warm), strict=True):
            assert locations(endpoint) == [flights[placed[key]], shard_location]
        assert sum(client.read(e).num_rows for e in warm.endpoints) == 800

        for stub_channel in channels:
            stub_channel.close()
        with flight.connect(flights[names[0]]) as node:  # the planner's action, bad input
            with pytest.raises(flight.FlightError) as caught:
                list(node.do_action(flight.Action("Contains", b"\xff garbage")))
            assert isinstance(from_flight_error(caught.value), InvalidArgument)

        # A node that is down: its shards are planned without it (misses), the rest still hit.
        run(caches[1].stop())
        degraded = client.plan(request)
        for endpoint, key in zip(degraded.endpoints, keys_of(degraded), strict=True):
            expected = [shard_location] if placed[key] == names[1] else [flights[names[0]]]
            assert locations(endpoint)[:1] == expected
        ids = sorted(i for e in degraded.endpoints for i in client.read(e)["id"].to_pylist())
        assert ids == list(range(800))


def test_cache_flight_addresses_must_pair_with_the_nodes(settings: Settings) -> None:
    mismatched = settings.model_copy(
        update={"cache_address": "127.0.0.1:1,127.0.0.1:2", "cache_flight_address": "127.0.0.1:3"}
    )
    with pytest.raises(ValueError, match="one per node, in the same order"):
        DataClient(mismatched)
