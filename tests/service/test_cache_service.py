"""The cache service in-process on port 0: gRPC KV, health, and Arrow Flight shards."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_service.flight import BATCH_BYTES, CacheFlightServer
from cache_service.server import CacheServer, start
from cache_service.store import CacheStore
from onehop.channels import aio_channel, flight_location
from onehop.dataplane import arrange
from onehop.errors import FailedPrecondition, InvalidArgument, NotFound, from_flight_error
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, data_pb2

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def cache(settings: Settings):
    running = await start(settings)
    yield running
    await running.stop()


@pytest.fixture
async def stub(cache, settings: Settings):
    async with aio_channel(cache.endpoints["grpc"], settings) as channel:
        yield cache_pb2_grpc.CacheStub(channel)


@pytest.fixture
def flight_client(cache):
    client = flight.connect(flight_location(cache.endpoints["flight"]))
    yield client
    client.close()


def shard_table(rows: int = 1000) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table(
        {"id": np.arange(rows), "x": rng.normal(size=rows), "label": rng.integers(0, 2, rows)}
    )


def ticket(**fields) -> data_pb2.ShardTicket:
    return data_pb2.ShardTicket(**{"dataset": "loans", "version": 1, "shard": 3, **fields})


async def test_health_turns_serving_only_once_the_store_is_open(settings: Settings) -> None:
    server = CacheServer(settings)
    address = await server.listen()
    try:
        async with aio_channel(address, settings) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest())
            assert check.status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache_pb2_grpc.CacheStub(channel).Get(cache_pb2.GetRequest(key=b"pred/a"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not open yet" in info.value.details()

            endpoints = await server.open()
            assert endpoints["grpc"] == address and endpoints["flight"]
            for service in ("", "onehop.v1.Cache"):
                check = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert check.status == SERVING
    finally:
        await server.stop()


async def test_grpc_round_trip(stub: cache_pb2_grpc.CacheStub) -> None:
    entries = [cache_pb2.Entry(key=f"pred/m/{i}".encode(), value=bytes([i]) * 8) for i in range(3)]
    put = await stub.BatchPut(cache_pb2.BatchPutRequest(entries=entries))
    assert put.written == 3
    await stub.Put(cache_pb2.PutRequest(key=b"shard/d/0", value=b"payload"))

    got = await stub.BatchGet(
        cache_pb2.BatchGetRequest(keys=[b"pred/m/2", b"pred/m/9", b"pred/m/0", b"shard/d/0"])
    )
    assert list(got.found) == [True, False, True, True]
    assert list(got.values) == [b"\x02" * 8, b"", b"\x00" * 8, b"payload"]
    single = await stub.Get(cache_pb2.GetRequest(key=b"pred/m/1"))
    assert single.found and single.value == b"\x01" * 8

    contains = await stub.Contains(cache_pb2.ContainsRequest(keys=[b"pred/m/1", b"pred/x"]))
    assert list(contains.found) == [True, False]
    deleted = await stub.Delete(cache_pb2.DeleteRequest(keys=[b"pred/m/1", b"pred/x"]))
    assert deleted.deleted == 1
    assert not (await stub.Get(cache_pb2.GetRequest(key=b"pred/m/1"))).found

    stats = await stub.GetStats(cache_pb2.GetStatsRequest())
    pred = stats.namespaces["pred"]
    assert (pred.hits, pred.misses, pred.entries) == (3, 2, 2)
    assert stats.namespaces["shard"].hits == 1
    assert stats.capacity_bytes == 64 << 20
    assert 0 < stats.used_bytes == pred.bytes + stats.namespaces["shard"].bytes


async def test_bad_key_is_invalid_argument_with_a_useful_message(
    stub: cache_pb2_grpc.CacheStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.BatchPut(
            cache_pb2.BatchPutRequest(entries=[cache_pb2.Entry(key=b"", value=b"v")])
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache key must be 1-511 bytes, got 0 bytes" in info.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Get(cache_pb2.GetRequest(key=b"k" * 600))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got 600 bytes" in info.value.details()


async def test_value_over_the_budget_is_resource_exhausted(settings: Settings) -> None:
    settings = settings.model_copy(update={"cache_size_bytes": 16 << 20})
    running = await start(settings)
    try:
        async with aio_channel(running.endpoints["grpc"], settings) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            await stub.Put(cache_pb2.PutRequest(key=b"pred/m/kept", value=b"k"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Put(cache_pb2.PutRequest(key=b"shard/d/big", value=bytes(17 << 20)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "budget of 16777216 bytes" in info.value.details()
            assert (await stub.Get(cache_pb2.GetRequest(key=b"pred/m/kept"))).value == b"k"
    finally:
        await running.stop()


async def test_flight_put_then_get_returns_the_shard(
    flight_client: flight.FlightClient, stub: cache_pb2_grpc.CacheStub
) -> None:
    table = shard_table()
    await asyncio.to_thread(put_shard, flight_client, ticket(), table)

    plain = await asyncio.to_thread(get_shard, flight_client, ticket())
    assert plain.equals(table)

    # Another epoch of the same prepared shard hits the same entry, shuffled for that epoch.
    shuffled_ticket = ticket(shuffle=True, seed=7, epoch=2, offset=100)
    shuffled = await asyncio.to_thread(get_shard, flight_client, shuffled_ticket)
    assert shuffled.equals(arrange(table, shuffled_ticket))
    assert shuffled.num_rows == 900
    assert not shuffled.column("id").equals(table.column("id").slice(100))
    assert sorted(shuffled.column("id").to_pylist()) != shuffled.column("id").to_pylist()

    stats = await stub.GetStats(cache_pb2.GetStatsRequest())
    assert stats.namespaces["shard"].hits == 2
    assert stats.namespaces["shard"].entries == 1


def test_flight_get_sends_in_place_and_lets_go_of_the_map_when_the_client_leaves(
    tmp_path: Path,
) -> None:
    store = CacheStore(tmp_path / "cache", 256 << 20)
    server = CacheFlightServer(store, "grpc+tcp://127.0.0.1:0")
    client = flight.connect(f"grpc+tcp://127.0.0.1:{server.port}")
    try:
        table = shard_table(rows=2_000_000)  # 48 MB, put as one batch: more than Flight buffers
        put_whole(client, ticket(), table)

        reader = client.do_get(flight.Ticket(ticket().SerializeToString()))
        first = reader.read_chunk().data
        # The entry is replaced under the stream: the stream still sends its own snapshot.
        for k in range(3):
            put_whole(client, ticket(), shard_table(rows=2_000_000).slice(k))
        streamed = pa.Table.from_batches([first, *reader.read_all().to_batches()])
        assert streamed.equals(table)
        # Stored (and sent) in batches of a few MiB, whatever the writer sent.
        assert max(batch.nbytes for batch in streamed.to_batches()) <= BATCH_BYTES

        reader = client.do_get(flight.Ticket(ticket().SerializeToString()))
        reader.read_chunk()
        reader.cancel()  # the client leaves mid-stream
        deadline = time.monotonic() + 10  # Flight ends the call once it sees that
        while store.pinned_reads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.pinned_reads == 0
    finally:
        client.close()
        server.shutdown()
        store.close()


async def test_flight_get_of_an_uncached_shard_is_not_found(
    flight_client: flight.FlightClient, stub: cache_pb2_grpc.CacheStub
) -> None:
    with pytest.raises(flight.FlightError) as info:
        await asyncio.to_thread(get_shard, flight_client, ticket(shard=99))
    error = from_flight_error(info.value)
    assert isinstance(error, NotFound)
    assert "shard not cached: loans v1 shard 99" in error.message
    assert "Traceback" not in str(info.value) and ".py" not in str(info.value)

    stats = await stub.GetStats(cache_pb2.GetStatsRequest())
    assert stats.namespaces["shard"].misses == 1


async def test_flight_malformed_ticket_is_invalid_argument(
    flight_client: flight.FlightClient,
) -> None:
    with pytest.raises(flight.FlightError) as info:
        await asyncio.to_thread(lambda: flight_client.do_get(flight.Ticket(b"\xff\xff")).read_all())
    assert from_flight_error(info.value).code == grpc.StatusCode.INVALID_ARGUMENT

    descriptor = flight.FlightDescriptor.for_path("loans")
    with pytest.raises(flight.FlightError) as info:
        await asyncio.to_thread(put_descriptor, flight_client, descriptor, shard_table(10))
    assert from_flight_error(info.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert "for_command" in str(info.value)


async def test_garbage_store_fails_start_and_keeps_the_file(settings: Settings) -> None:
    data = settings.service_dir("cache") / "data.mdb"
    garbage = os.urandom(32 << 10)
    data.write_bytes(garbage)
    with pytest.raises(FailedPrecondition, match="not a valid LMDB file"):
        await start(settings)
    assert data.read_bytes() == garbage


async def test_restarted_service_serves_its_old_entries(settings: Settings) -> None:
    running = await start(settings)
    async with aio_channel(running.endpoints["grpc"], settings) as channel:
        await cache_pb2_grpc.CacheStub(channel).Put(
            cache_pb2.PutRequest(key=b"pred/m/warm", value=b"still here")
        )
    await running.stop()

    running = await start(settings)
    try:
        async with aio_channel(running.endpoints["grpc"], settings) as channel:
            got = await cache_pb2_grpc.CacheStub(channel).Get(
                cache_pb2.GetRequest(key=b"pred/m/warm")
            )
        assert got.found and got.value == b"still here"
    finally:
        await running.stop()


def put_descriptor(
    client: flight.FlightClient, descriptor: flight.FlightDescriptor, table: pa.Table
) -> None:
    writer, _ = client.do_put(descriptor, table.schema)
    writer.write_table(table, max_chunksize=256)
    writer.close()


def put_whole(client: flight.FlightClient, shard: data_pb2.ShardTicket, table: pa.Table) -> None:
    writer, _ = client.do_put(
        flight.FlightDescriptor.for_command(shard.SerializeToString()), table.schema
    )
    writer.write_table(table)
    writer.close()


def put_shard(client: flight.FlightClient, shard: data_pb2.ShardTicket, table: pa.Table) -> None:
    put_descriptor(client, flight.FlightDescriptor.for_command(shard.SerializeToString()), table)


def get_shard(client: flight.FlightClient, shard: data_pb2.ShardTicket) -> pa.Table:
    return client.do_get(flight.Ticket(shard.SerializeToString())).read_all()


async def test_touch_counts_remote_hits_and_skips_unknown_keys(
    stub: cache_pb2_grpc.CacheStub,
) -> None:
    await stub.Put(cache_pb2.PutRequest(key=b"pred/m/seen", value=b"v"))
    reply = await stub.Touch(
        cache_pb2.TouchRequest(
            hits=[b"pred/m/seen", b"pred/m/seen", b"pred/m/evicted", b""],
            misses={"pred": 3, "": 5, "x" * 200: 1},
            dropped=7,
        )
    )
    assert reply.applied == 2
    stats = await stub.GetStats(cache_pb2.GetStatsRequest())
    assert (stats.namespaces["pred"].hits, stats.namespaces["pred"].misses) == (2, 3)
    assert set(stats.namespaces) == {"pred"}  # malformed namespaces were not counted
    assert stats.hints_dropped == 7


async def test_absurd_touch_counts_are_skipped_and_stats_keep_answering(
    stub: cache_pb2_grpc.CacheStub,
) -> None:
    await stub.Touch(cache_pb2.TouchRequest(misses={"pred": 3}))
    hostile = cache_pb2.TouchRequest(misses={"pred": 2**64 - 1}, dropped=2**64 - 1)
    for _ in range(2):  # twice: the sums used to pass 2**64 and break GetStats for good
        await stub.Touch(hostile)
    stats = await stub.GetStats(cache_pb2.GetStatsRequest())
    assert stats.namespaces["pred"].misses == 3 and stats.hints_dropped == 0


def test_stats_saturate_at_the_uint64_maximum() -> None:
    from cache_service.servicer import UINT64_MAX, stats_to_proto
    from cache_service.store import NamespaceStats, StoreStats

    huge = 2**70
    proto = stats_to_proto(
        StoreStats({"pred": NamespaceStats(hits=huge, misses=5)}, 1 << 20, 0, huge, huge)
    )
    assert (proto.namespaces["pred"].hits, proto.namespaces["pred"].misses) == (UINT64_MAX, 5)
    assert proto.commits == proto.hints_dropped == UINT64_MAX


async def test_unreadable_stream_put_message_is_invalid_argument(cache, settings: Settings) -> None:
    async with aio_channel(cache.endpoints["grpc"], settings) as channel:
        stream_put = channel.stream_unary("/onehop.v1.Cache/StreamPut")
        first = cache_pb2.StreamPutRequest(key=b"shard/d/x").SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream_put(iter([first, b"\xff"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        got = await cache_pb2_grpc.CacheStub(channel).Get(cache_pb2.GetRequest(key=b"shard/d/x"))
        assert not got.found


class _WriterKilled(BaseException):
    """Escapes every `except Exception`: stands for a bug that ends the writer thread."""


async def test_a_dead_writer_turns_health_not_serving_and_puts_unavailable(
    settings: Settings,
) -> None:
    server = CacheServer(settings)
    address = await server.listen()
    try:
        await server.open()
        assert server.store is not None

        def fatal_clock() -> float:  # the writer calls the clock at the start of a commit
            raise _WriterKilled()

        server.store._clock = fatal_clock  # fault injection: the next commit kills it
        async with aio_channel(address, settings) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            codes = []
            for _ in range(2):  # the one in flight, then one refused at once
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Put(cache_pb2.PutRequest(key=b"pred/m/x", value=b"v"), timeout=10)
                codes.append(info.value.code())
            assert codes == [grpc.StatusCode.UNAVAILABLE] * 2
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            async for reply in watch:  # SERVING first (maybe), then NOT_SERVING
                if reply.status == NOT_SERVING:
                    break
            watch.cancel()
            check = await health.Check(health_pb2.HealthCheckRequest(service="onehop.v1.Cache"))
            assert check.status == NOT_SERVING
    finally:
        await server.stop()


async def test_stream_put_and_get_of_a_value_larger_than_one_chunk(
    stub: cache_pb2_grpc.CacheStub,
) -> None:
    from cache_service.servicer import STREAM_CHUNK_BYTES

    value = os.urandom(2 * STREAM_CHUNK_BYTES + 123)

    async def chunks():
        yield cache_pb2.StreamPutRequest(key=b"shard/d/large", ttl_seconds=60)
        for offset in range(0, len(value), 700_000):
            yield cache_pb2.StreamPutRequest(chunk=value[offset : offset + 700_000])

    put = await stub.StreamPut(chunks())
    assert put.bytes == len(value)

    parts = [
        part async for part in stub.StreamGet(cache_pb2.StreamGetRequest(key=b"shard/d/large"))
    ]
    assert len(parts) == 3 and all(part.found for part in parts)
    assert parts[0].total_bytes == len(value)
    assert b"".join(part.chunk for part in parts) == value
    assert (await stub.Get(cache_pb2.GetRequest(key=b"shard/d/large"))).value == value

    missing = [part async for part in stub.StreamGet(cache_pb2.StreamGetRequest(key=b"shard/x"))]
    assert [part.found for part in missing] == [False]


async def test_stream_put_errors_keep_the_cache_unchanged(settings: Settings) -> None:
    settings = settings.model_copy(update={"cache_size_bytes": 16 << 20})
    running = await start(settings)
    try:
        async with aio_channel(running.endpoints["grpc"], settings) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            await stub.Put(cache_pb2.PutRequest(key=b"shard/d/big", value=b"old"))

            async def too_large():
                yield cache_pb2.StreamPutRequest(key=b"shard/d/big")
                for _ in range(17):
                    yield cache_pb2.StreamPutRequest(chunk=bytes(1 << 20))

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.StreamPut(too_large())
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            async def no_key():
                yield cache_pb2.StreamPutRequest(chunk=b"data")

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.StreamPut(no_key())
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "1-511 bytes, got 0" in info.value.details()

            got = await stub.Get(cache_pb2.GetRequest(key=b"shard/d/big"))
            assert got.value == b"old"
    finally:
        await running.stop()


async def test_corrupt_value_over_grpc_is_a_miss_counted_in_stats(settings: Settings) -> None:
    import lmdb

    running = await start(settings)
    async with aio_channel(running.endpoints["grpc"], settings) as channel:
        await cache_pb2_grpc.CacheStub(channel).Put(
            cache_pb2.PutRequest(key=b"pred/m/flip", value=b"payload")
        )
    await running.stop()
    env = lmdb.open(str(settings.service_dir("cache")), map_size=128 << 20)
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(b"pred/m/flip"))
        raw[-1] ^= 0x01
        txn.put(b"pred/m/flip", bytes(raw))
    env.close()

    running = await start(settings)
    try:
        async with aio_channel(running.endpoints["grpc"], settings) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            assert not (await stub.Get(cache_pb2.GetRequest(key=b"pred/m/flip"))).found
            pred = (await stub.GetStats(cache_pb2.GetStatsRequest())).namespaces["pred"]
            assert (pred.corrupt, pred.misses, pred.hits) == (1, 1, 0)
            # Removed by the writer, so the entry count drops to zero.
            for _ in range(1000):  # up to 10 s: the removal is a durable commit
                if not (
                    await stub.Contains(cache_pb2.ContainsRequest(keys=[b"pred/m/flip"]))
                ).found[0]:
                    break
                await asyncio.sleep(0.01)
            stats = await stub.GetStats(cache_pb2.GetStatsRequest())
            assert stats.namespaces["pred"].entries == 0
    finally:
        await running.stop()


async def test_flight_batch_get_action_matches_the_grpc_batch_get(
    flight_client: flight.FlightClient, stub: cache_pb2_grpc.CacheStub
) -> None:
    from cache_service.client import flight_batch_get, unpack_batch

    entries = [cache_pb2.Entry(key=f"pred/m/{i}".encode(), value=bytes([i]) * i) for i in range(5)]
    await stub.BatchPut(cache_pb2.BatchPutRequest(entries=entries))
    keys = [b"pred/m/4", b"pred/m/none", b"pred/m/0", b"pred/m/2"]

    via_flight = await asyncio.to_thread(flight_batch_get, flight_client, keys)
    packed = await stub.BatchGet(cache_pb2.BatchGetRequest(keys=keys, packed=True))
    plain = await stub.BatchGet(cache_pb2.BatchGetRequest(keys=keys))
    assert via_flight == unpack_batch(packed) == unpack_batch(plain)
    assert via_flight == [b"\x04" * 4, None, b"", b"\x02" * 2]
    assert list(packed.values) == [] and list(packed.sizes) == [4, 0, 0, 2]
    pred = (await stub.GetStats(cache_pb2.GetStatsRequest())).namespaces["pred"]
    assert (pred.hits, pred.misses) == (9, 3)

    with pytest.raises(InvalidArgument, match="1-511 bytes, got 0"):
        await asyncio.to_thread(flight_batch_get, flight_client, [b"pred/ok", b""])
    bad_body = flight.Action("BatchGet", b"\xff\xff\xff")
    with pytest.raises(flight.FlightError) as info:
        await asyncio.to_thread(lambda: list(flight_client.do_action(bad_body)))
    assert from_flight_error(info.value).code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(flight.FlightError) as info:
        await asyncio.to_thread(lambda: list(flight_client.do_action(flight.Action("Nope", b""))))
    assert "unknown cache action 'Nope'" in from_flight_error(info.value).message
