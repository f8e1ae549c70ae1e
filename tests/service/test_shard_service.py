"""The shard service in-process on port 0, driven by the stock pyarrow.flight client."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onehop.channels import aio_channel, flight_location
from onehop.dataplane import INGEST_ABORT, epoch_permutation
from onehop.errors import (
    InvalidArgument,
    NotFound,
    OnehopError,
    PermissionDenied,
    ResourceExhausted,
    from_flight_error,
)
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2
from shard_service.columns import CATEGORICAL
from shard_service.flight import WriteThrough
from shard_service.server import start

pytestmark = pytest.mark.timeout(60)


def make_table(rows: int = 2000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": pa.array(np.arange(rows), pa.int64()),
            "income": rng.normal(50_000, 12_000, rows),
            "age": pa.array(rng.integers(18, 90, rows), pa.int32()),
            "city": pa.array(rng.choice(["paris", "lima", "oslo"], rows)),
            "label": pa.array(rng.integers(0, 2, rows), pa.int8()),
        }
    )


@pytest.fixture
async def shard(settings: Settings) -> AsyncIterator[dict[str, str]]:
    settings = settings.model_copy(update={"default_shards": 4})
    running = await start(settings)
    try:
        yield running.endpoints
    finally:
        await running.stop()


@pytest.fixture
def client(shard: dict[str, str]):
    with flight.connect(flight_location(shard["flight"])) as client:
        yield client


def stored_schema(schema: pa.Schema) -> pa.Schema:
    """What the service serves: strings dictionary-encoded."""
    return pa.schema(
        [pa.field(f.name, CATEGORICAL) if f.type == pa.string() else f for f in schema]
    )


def decoded(table: pa.Table) -> pa.Table:
    return table.cast(
        pa.schema(
            [pa.field(f.name, pa.string()) if f.type == CATEGORICAL else f for f in table.schema]
        )
    )


def put(client: flight.FlightClient, descriptor, table: pa.Table) -> data_pb2.DatasetInfo:
    writer, results = client.do_put(descriptor, table.schema)
    with writer:
        for batch in table.to_batches(max_chunksize=300):
            writer.write_batch(batch)
        writer.done_writing()
        metadata = results.read()
    return data_pb2.DatasetInfo.FromString(metadata.to_pybytes())


def read_endpoints(client: flight.FlightClient, info: flight.FlightInfo) -> list[pa.Table]:
    return [client.do_get(endpoint.ticket).read_all() for endpoint in info.endpoints]


def ticket_of(endpoint: flight.FlightEndpoint) -> data_pb2.ShardTicket:
    return data_pb2.ShardTicket.FromString(endpoint.ticket.ticket)


def command(**fields) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(data_pb2.DataRequest(**fields).SerializeToString())


async def test_health_is_serving(shard: dict[str, str], settings: Settings) -> None:
    async with aio_channel(shard["grpc"], settings) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_put_list_plan_get_reconstructs_the_table(client, shard) -> None:
    table = make_table()
    info = put(client, flight.FlightDescriptor.for_path("loans"), table)
    assert (info.name, info.version, info.rows, len(info.shards)) == ("loans", 1, 2000, 4)
    assert {c.name for c in info.columns} == set(table.schema.names)
    put(client, flight.FlightDescriptor.for_path("loans"), table.slice(0, 10))  # version 2

    listed = list(client.list_flights())
    assert len(listed) == 1
    assert listed[0].descriptor.path == [b"loans", b"2"]
    assert listed[0].total_records == 10
    put(client, flight.FlightDescriptor.for_path("other"), table.slice(0, 5))
    assert [i.descriptor.path[0] for i in client.list_flights()] == [b"loans", b"other"]
    assert [i.descriptor.path[0] for i in client.list_flights(b"oth")] == [b"other"]

    plan = client.get_flight_info(flight.FlightDescriptor.for_path("loans", "1"))
    assert plan.total_records == 2000 and plan.total_bytes > 0
    assert plan.schema == stored_schema(table.schema)
    assert [ticket_of(e).shard for e in plan.endpoints] == [0, 1, 2, 3]
    assert {ticket_of(e).version for e in plan.endpoints} == {1}
    for endpoint in plan.endpoints:
        assert [loc.uri.decode() for loc in endpoint.locations] == [
            flight_location(shard["flight"])
        ]
    whole = pa.concat_tables(read_endpoints(client, plan)).sort_by("id")
    assert decoded(whole).equals(table)

    newest = client.get_flight_info(flight.FlightDescriptor.for_path("loans"))
    assert newest.total_records == 10
    schema = client.get_schema(flight.FlightDescriptor.for_path("loans")).schema
    assert schema == stored_schema(table.schema)


def test_ingest_command_with_shards_and_key(client) -> None:
    table = make_table(rows=500)
    request = data_pb2.IngestRequest(dataset="keyed", shards=3, key="city")
    info = put(client, flight.FlightDescriptor.for_command(request.SerializeToString()), table)
    assert len(info.shards) == 3 and info.rows == 500
    plan = client.get_flight_info(command(dataset="keyed", columns=["city"]))
    cities = [set(t.column("city").to_pylist()) for t in read_endpoints(client, plan)]
    assert sorted(c for group in cities for c in group) == ["lima", "oslo", "paris"]


def test_standardised_read(client) -> None:
    table = make_table()
    put(client, flight.FlightDescriptor.for_path("loans"), table)
    preprocess = data_pb2.Preprocessing(
        scaling=data_pb2.SCALING_STANDARD, passthrough=["label", "id"]
    )
    plan = client.get_flight_info(
        command(dataset="loans", preprocess=preprocess, columns=["id", "income", "age", "label"])
    )
    assert plan.schema.names == ["id", "income", "age", "label"]
    assert plan.schema.types == [pa.int64(), pa.float32(), pa.float32(), pa.int8()]
    out = pa.concat_tables(read_endpoints(client, plan)).sort_by("id")
    assert out.schema == plan.schema
    for name in ("income", "age"):
        raw = table.column(name).to_numpy().astype(np.float64)
        expected = (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose(out.column(name).to_numpy(), expected, rtol=1e-5, atol=1e-5)
    assert out.column("label").equals(table.column("label"))


def test_shuffle_is_a_function_of_seed_and_epoch(client) -> None:
    table = make_table()
    put(client, flight.FlightDescriptor.for_path("loans"), table)

    def epoch(seed: int, number: int) -> tuple[list[int], list[int]]:
        plan = client.get_flight_info(
            command(dataset="loans", shuffle=True, seed=seed, epoch=number, columns=["id"])
        )
        shards = [ticket_of(e).shard for e in plan.endpoints]
        assert shards == epoch_permutation(4, seed, number).tolist()
        ids = pa.concat_tables(read_endpoints(client, plan)).column("id").to_pylist()
        return shards, ids

    shards0, ids0 = epoch(seed=7, number=0)
    shards1, ids1 = epoch(seed=7, number=1)
    assert sorted(ids0) == sorted(ids1) == list(range(2000))
    assert ids0 != ids1
    assert epoch(seed=7, number=0) == (shards0, ids0)
    unshuffled = client.get_flight_info(command(dataset="loans", columns=["id"]))
    plain = pa.concat_tables(read_endpoints(client, unshuffled)).column("id").to_pylist()
    assert ids0 != plain


def test_offset_resumes_the_same_order(client) -> None:
    table = make_table()
    put(client, flight.FlightDescriptor.for_path("loans"), table)
    plan = client.get_flight_info(command(dataset="loans", shuffle=True, seed=3, epoch=2))
    endpoint = plan.endpoints[0]
    full = client.do_get(endpoint.ticket).read_all()
    ticket = ticket_of(endpoint)
    ticket.offset = 123
    rest = client.do_get(flight.Ticket(ticket.SerializeToString())).read_all()
    assert rest.equals(full.slice(123))
    ticket.offset = full.num_rows + 5
    assert client.do_get(flight.Ticket(ticket.SerializeToString())).read_all().num_rows == 0


def test_actions(client) -> None:
    put(client, flight.FlightDescriptor.for_path("loans"), make_table(rows=100))
    assert {a.type for a in client.list_actions()} == {"describe", "list-datasets", "ingest"}
    body = data_pb2.DataRequest(dataset="loans").SerializeToString()
    (result,) = list(client.do_action(flight.Action("describe", body)))
    info = data_pb2.DatasetInfo.FromString(result.body.to_pybytes())
    assert (info.name, info.version, info.rows, list(info.versions)) == ("loans", 1, 100, [1])
    (result,) = list(client.do_action(flight.Action("list-datasets", b"")))
    listed = data_pb2.ListDatasetsResponse.FromString(result.body.to_pybytes())
    assert [d.name for d in listed.datasets] == ["loans"]


def error_of(call) -> tuple[OnehopError, str]:
    with pytest.raises((flight.FlightError, pa.ArrowException)) as caught:
        call()
    return from_flight_error(caught.value), str(caught.value)


def test_errors_are_mapped_without_tracebacks(client) -> None:
    put(client, flight.FlightDescriptor.for_path("loans"), make_table(rows=100))
    cases = [
        (lambda: client.get_flight_info(flight.FlightDescriptor.for_path("nope")), NotFound),
        (lambda: client.get_flight_info(flight.FlightDescriptor.for_path("loans", "9")), NotFound),
        (lambda: client.get_flight_info(command(dataset="loans", columns=["x"])), InvalidArgument),
        (lambda: client.get_flight_info(flight.FlightDescriptor.for_path("a/b")), InvalidArgument),
        (lambda: client.get_flight_info(flight.FlightDescriptor.for_path("..")), InvalidArgument),
        (lambda: client.do_get(flight.Ticket(b"\xff\xff garbage")).read_all(), InvalidArgument),
        (
            lambda: client.do_get(
                flight.Ticket(data_pb2.ShardTicket(dataset="nope").SerializeToString())
            ).read_all(),
            NotFound,
        ),
        (
            lambda: client.do_get(
                flight.Ticket(data_pb2.ShardTicket(dataset="loans", shard=99).SerializeToString())
            ).read_all(),
            NotFound,
        ),
        (lambda: list(client.do_action(flight.Action("drop-all", b""))), InvalidArgument),
    ]
    for call, expected in cases:
        error, text = error_of(call)
        assert isinstance(error, expected), (text, error)
        assert "Traceback" not in text and 'File "' not in text
    error, text = error_of(cases[0][0])
    assert error.message == "no dataset 'nope'"


def test_failed_put_publishes_nothing(client) -> None:
    empty = pa.table({"x": pa.array([], pa.float64())})
    error, text = error_of(lambda: put(client, flight.FlightDescriptor.for_path("empty"), empty))
    assert isinstance(error, InvalidArgument) and "no rows" in error.message
    error, _ = error_of(lambda: put(client, flight.FlightDescriptor.for_path("../x"), empty))
    assert isinstance(error, InvalidArgument)
    assert list(client.list_flights()) == []


def test_an_abandoned_put_publishes_nothing(client) -> None:
    table = make_table(rows=100)
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("loans"), table.schema)
    writer.write_table(table)
    writer.write_metadata(pa.py_buffer(INGEST_ABORT))
    error, _ = error_of(writer.close)
    assert isinstance(error, InvalidArgument) and "abandoned" in error.message
    assert list(client.list_flights()) == []


class BlockingCache(flight.FlightServerBase):
    """A cache stand-in whose DoPut waits until released, so the write-through queue fills."""

    def __init__(self) -> None:
        super().__init__("grpc+tcp://127.0.0.1:0")
        self.release = threading.Event()
        self.entered = threading.Event()
        self.received: list[bytes] = []

    def do_put(self, context, descriptor, reader, writer) -> None:
        self.entered.set()
        reader.read_all()
        self.release.wait(30)
        self.received.append(descriptor.command)


def test_write_through_drops_when_full_and_never_raises() -> None:
    table = make_table(rows=10)
    tickets = [data_pb2.ShardTicket(dataset="d", version=1, shard=k) for k in range(4)]
    with BlockingCache() as cache:
        write_through = WriteThrough(f"127.0.0.1:{cache.port}", max_pending=1)
        assert write_through.submit(tickets[0], table)
        assert cache.entered.wait(10)  # the thread is now stuck in the first DoPut
        assert write_through.submit(tickets[1], table)  # fills the queue of one
        assert not write_through.submit(tickets[2], table)  # dropped, not blocked
        assert not write_through.submit(tickets[1], table)  # already on its way
        assert write_through.dropped == 1
        cache.release.set()
        write_through.close(timeout=10)
        assert write_through.written == 2
        assert [data_pb2.ShardTicket.FromString(c).shard for c in cache.received] == [0, 1]

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    failing = WriteThrough(dead, max_pending=4, timeout_seconds=2)
    assert failing.submit(tickets[3], table)
    failing.close(timeout=10)
    assert (failing.written, failing.failed) == (0, 1)


def test_write_through_waits_for_reads_streaming_here() -> None:
    table = make_table(rows=10)
    shard = data_pb2.ShardTicket(dataset="d", version=1, shard=0)
    with BlockingCache() as cache:
        cache.release.set()
        write_through = WriteThrough(f"127.0.0.1:{cache.port}", max_pending=4)
        with write_through.streaming():
            assert write_through.submit(shard, table)
            assert not cache.entered.wait(0.5)  # held back while a read streams
        assert cache.entered.wait(10)  # sent once the read ended
        write_through.close(timeout=10)
        assert write_through.written == 1

        # A read that never ends delays a write by max_delay_seconds at most.
        patient = WriteThrough(f"127.0.0.1:{cache.port}", max_pending=4, max_delay_seconds=0.1)
        with patient.streaming():
            assert patient.submit(shard, table)
            patient.close(timeout=10)
            assert patient.written == 1


def ingest_action(client: flight.FlightClient, **fields) -> data_pb2.DatasetInfo:
    body = data_pb2.IngestRequest(**fields).SerializeToString()
    (result,) = list(client.do_action(flight.Action("ingest", body)))
    return data_pb2.DatasetInfo.FromString(result.body.to_pybytes())


def test_ingest_action_reads_sources_under_the_root(client, settings: Settings, tmp_path) -> None:
    table = make_table(rows=500)
    source = settings.data_dir / "incoming" / "loans.csv"
    source.parent.mkdir(parents=True)
    pacsv.write_csv(table, source)
    (source.parent / "ragged.csv").write_text("a,b\n1,2\n3\n")
    outside = tmp_path / "outside.csv"
    pacsv.write_csv(table, outside)

    info = ingest_action(
        client, dataset="loans", source="incoming/loans.csv", key="age", partitioning=3,
        bounds=[30, 60],
    )  # fmt: skip
    assert (info.rows, [s.rows for s in info.shards]) == (500, [
        int((table.column("age").to_numpy() < 30).sum()),
        int(((table.column("age").to_numpy() >= 30) & (table.column("age").to_numpy() < 60)).sum()),
        int((table.column("age").to_numpy() >= 60).sum()),
    ])  # fmt: skip
    assert info.partitioning == "range:age"
    city = next(c for c in info.columns if c.name == "city")
    assert list(city.categories) == ["lima", "oslo", "paris"]

    cases = [
        ({"source": "incoming/ragged.csv"}, InvalidArgument, "Row #3"),
        ({"source": str(outside)}, PermissionDenied, "outside the source root"),
        ({"source": "http://example.com/x.csv"}, InvalidArgument, "not allowed"),
        ({"source": "incoming/none.csv"}, NotFound, "no such source"),
    ]
    for fields, expected, message in cases:
        error, text = error_of(lambda f=fields: ingest_action(client, dataset="other", **f))
        assert isinstance(error, expected) and message in error.message, text
        assert "Traceback" not in text
    assert [i.descriptor.path[0] for i in client.list_flights()] == [b"loans"]


def test_corrupt_ipc_in_doput_is_refused(client) -> None:
    good = pa.array(["alpha", "beta"])
    _, offsets, data = good.buffers()
    bad_data = pa.py_buffer(b"\xff\xfe" + data.to_pybytes()[2:])
    corrupt = pa.Array.from_buffers(pa.string(), 2, [None, offsets, bad_data])
    table = pa.table({"name": corrupt})
    error, text = error_of(lambda: put(client, flight.FlightDescriptor.for_path("names"), table))
    assert isinstance(error, InvalidArgument) and "corrupt record batch" in error.message, text
    assert list(client.list_flights()) == []
    # The service is still up and ingests the next, sound stream.
    assert (
        put(client, flight.FlightDescriptor.for_path("names"), pa.table({"name": good})).rows == 2
    )


def test_filtered_preprocessed_plan(client) -> None:
    table = make_table()
    put(client, flight.FlightDescriptor.for_path("loans"), table)
    tree = data_pb2.Filter(
        compare=data_pb2.Comparison(
            column="city", op=data_pb2.Comparison.EQ, value=data_pb2.Literal(text="lima")
        )
    )
    preprocess = data_pb2.Preprocessing(
        scaling=data_pb2.SCALING_STANDARD,
        categorical=data_pb2.CATEGORICAL_ONE_HOT,
        passthrough=["id"],
    )
    plan = client.get_flight_info(
        command(
            dataset="loans", columns=["id", "city", "income"], filter=tree, preprocess=preprocess
        )
    )
    assert plan.schema.names == ["id", "city=lima", "city=oslo", "city=paris", "income"]
    assert all(ticket_of(e).filter == tree for e in plan.endpoints)
    out = pa.concat_tables(read_endpoints(client, plan)).sort_by("id")
    lima = np.flatnonzero(table.column("city").to_numpy(zero_copy_only=False) == "lima")
    np.testing.assert_array_equal(out.column("id").to_numpy(), lima)
    assert set(out.column("city=lima").to_pylist()) == {1.0}
    error, _ = error_of(
        lambda: client.get_flight_info(
            command(dataset="loans", filter=data_pb2.Filter(is_null="nope"))
        )
    )
    assert isinstance(error, InvalidArgument) and "no column 'nope'" in error.message


async def test_oversized_batches_are_refused(settings: Settings) -> None:
    running = await start(settings.model_copy(update={"max_message_bytes": 1 << 20}))
    try:
        with flight.connect(flight_location(running.endpoints["flight"])) as client:
            big = pa.table({"x": np.zeros(300_000)})  # one 2.4 MB batch
            writer, results = client.do_put(flight.FlightDescriptor.for_path("big"), big.schema)
            writer.write_batch(big.to_batches()[0])
            writer.done_writing()
            error, text = error_of(writer.close)
            assert isinstance(error, ResourceExhausted), text
            assert "batch 1 is 2400000 bytes" in error.message
            assert list(client.list_flights()) == []
            assert put(client, flight.FlightDescriptor.for_path("big"), big.slice(0, 1000)).rows
    finally:
        await running.stop()
