"""The shard service's Arrow Flight edge: ingest (DoPut, or the "ingest" action for a file the
service reads itself), plans (GetFlightInfo), shard reads (DoGet) with write-through to the
cache, and the describe/list actions.

Descriptors: `for_path(name)`, `for_path(name, version)` or `for_command(<DataRequest>)`;
DoPut also takes `for_command(<IngestRequest>)`. Tickets are `ShardTicket` bytes.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import pyarrow as pa
import pyarrow.flight as flight

from onehop.channels import flight_location
from onehop.dataplane import (
    ACTIONS,
    CacheNodes,
    arrange,
    data_request,
    epoch_permutation,
    flight_client,
    ingest_request,
    parse_message,
    put_batches,
    put_schema,
    shard_ticket,
)
from onehop.errors import InvalidArgument, flight_errors
from onehop.keys import shard_key, validate_name
from onehop.server import flight_server_options
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2
from shard_service.catalog import Catalog, DatasetInfo
from shard_service.convert import info_to_pb, partitioning_of, prep_of, ticket_for
from shard_service.sources import Sources

log = logging.getLogger(__name__)

# Record batches on the wire: big enough to amortise per-message cost, small enough to stay
# far below the gRPC receive limit for any row width.
STREAM_BATCH_BYTES = 4 << 20
STREAM_BATCH_ROWS = 256 * 1024
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def _batch_rows(table: pa.Table) -> int:
    """Rows per streamed batch so that one message carries about STREAM_BATCH_BYTES."""
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    return max(1, min(STREAM_BATCH_ROWS, STREAM_BATCH_BYTES // row_bytes))


def _row_bytes(schema: pa.Schema) -> int | None:
    """Bytes per row of the Arrow data a read sends (dictionary columns by their indices);
    None when a column has no fixed width."""
    total = 0
    for field in schema:
        type_ = field.type.index_type if pa.types.is_dictionary(field.type) else field.type
        try:
            total += (type_.bit_width + 7) // 8
        except ValueError:  # strings, lists: no fixed width
            return None
    return total


class WriteThrough:
    """Copies prepared shards to the cache's Flight DoPut, off the critical path: each to
    the node that holds its key (`CacheNodes.place`, the placement every planner uses),
    over TLS and with the token when `settings` ask for them.

    A queue bounded in entries and bytes feeds one background thread; when it is full the
    shard is dropped (the next miss will offer it again). Failures are logged and counted, never
    raised into a response.

    A write waits until no read is streaming here (`streaming()`), for up to
    `max_delay_seconds`: sending a shard to the cache costs about as much CPU as serving it,
    so writing while other shards of the same plan stream would slow the very reads it is
    meant to speed up.
    """

    _STOP = object()

    def __init__(
        self,
        nodes: CacheNodes | str,
        max_pending: int,
        max_pending_bytes: int = 256 << 20,
        timeout_seconds: float = 30.0,
        max_delay_seconds: float = 2.0,
        settings: Settings | None = None,
    ):
        # A bare address is one node (its Flight host:port).
        self.nodes = CacheNodes((nodes,), (nodes,)) if isinstance(nodes, str) else nodes
        if not self.nodes:
            raise ValueError("write-through needs at least one cache node")
        self.settings = settings or Settings()  # None: the environment's
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._max_delay = max_delay_seconds
        self._streams = 0
        self._quiet = threading.Condition()
        self._max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self._options = flight.FlightCallOptions(timeout=timeout_seconds)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._pending: set[bytes] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shard-write-through", daemon=True)
        self._thread.start()

    def submit(self, ticket: data_pb2.ShardTicket, table: pa.Table) -> bool:
        """Queue one prepared shard; False when it was dropped or is already queued."""
        key = shard_key(ticket)
        size = table.nbytes
        with self._lock:
            if key in self._pending:
                return False  # the same prepared shard is already on its way
            if self._pending_bytes + size > self._max_pending_bytes and self._pending:
                self.dropped += 1
                return False
            try:
                self._queue.put_nowait((key, ticket.SerializeToString(), table))
            except queue.Full:
                self.dropped += 1
                log.debug("write-through queue full; dropped %s", key.decode())
                return False
            self._pending.add(key)
            self._pending_bytes += size
        return True

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Marks a read streaming from this service, which queued writes wait for."""
        with self._quiet:
            self._streams += 1
        try:
            yield
        finally:
            with self._quiet:
                self._streams -= 1
                if not self._streams:
                    self._quiet.notify_all()

    def _run(self) -> None:
        clients: dict[str, flight.FlightClient] = {}
        while True:
            item = self._queue.get()
            if item is self._STOP:
                break
            with self._quiet:
                self._quiet.wait_for(lambda: not self._streams, self._max_delay)
            key, ticket, table = item
            try:
                address = self.nodes.addresses[self.nodes.place(key)]
                client = clients.get(address)
                if client is None:
                    location = flight_location(address, self.settings)
                    client = clients[address] = flight_client(location, self.settings)
                descriptor = flight.FlightDescriptor.for_command(ticket)
                writer, reader = client.do_put(descriptor, table.schema, options=self._options)
                writer.write_table(table)
                writer.done_writing()
                writer.close()
                self.written += 1
            except Exception as exc:  # a cache that is down or full must not affect serving
                self.failed += 1
                log.warning("write-through of %s to the cache failed: %s", key.decode(), exc)
            finally:
                with self._lock:
                    self._pending.discard(key)
                    self._pending_bytes -= table.nbytes
        for client in clients.values():
            client.close()

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued (up to `timeout`), then stop the thread."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)


class ShardFlightServer(flight.FlightServerBase):
    """Arrow Flight over a Catalog; it listens from construction (read `.port`)."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        write_through: WriteThrough | None = None,
        sources: Sources | None = None,
    ):
        super().__init__(
            flight_location(f"{settings.host}:{settings.shard_flight_port}", settings),
            **flight_server_options(settings),
        )
        self.catalog = catalog
        self.max_batch_bytes = settings.max_message_bytes
        self.write_through = write_through
        self.sources = sources
        host = settings.host
        if host in _WILDCARD_HOSTS:
            # Listening on every interface: advertise the configured address or our name.
            host = settings.shard_address.rpartition(":")[0] or socket.gethostname()
        self.address = f"{host}:{self.port}"
        # What plans hand out: grpc+tls when TLS is on.
        self.location = flight.Location(flight_location(self.address, settings))

    # --- discovery -------------------------------------------------------------------------

    def list_flights(
        self, context: flight.ServerCallContext, criteria: bytes
    ) -> Iterator[flight.FlightInfo]:
        """One FlightInfo per dataset (newest version); criteria, if any, is a name prefix."""
        with flight_errors():
            prefix = (criteria or b"").decode("utf-8", errors="replace")
            infos = []
            for info in self.catalog.list():
                if not info.name.startswith(prefix):
                    continue
                descriptor = flight.FlightDescriptor.for_path(info.name, str(info.version))
                request = data_pb2.DataRequest(dataset=info.name, version=info.version)
                infos.append(self._flight_info(descriptor, request, info))
            return iter(infos)

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        with flight_errors():
            request = data_request(descriptor)
            info = self.catalog.describe(request.dataset, request.version)
            return self._flight_info(descriptor, request, info)

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        with flight_errors():
            request = data_request(descriptor)
            info = self.catalog.describe(request.dataset, request.version)
            return flight.SchemaResult(self.catalog.prepared_schema(info, prep_of(request, info)))

    def _flight_info(
        self,
        descriptor: flight.FlightDescriptor,
        request: data_pb2.DataRequest,
        info: DatasetInfo,
    ) -> flight.FlightInfo:
        schema = self.catalog.prepared_schema(info, prep_of(request, info))
        shards = len(info.shards)
        order = (
            epoch_permutation(shards, request.seed, request.epoch)
            if request.shuffle
            else range(shards)
        )
        endpoints = [
            flight.FlightEndpoint(
                ticket_for(request, info.version, int(shard)).SerializeToString(),
                [self.location],
            )
            for shard in order
        ]
        if request.HasField("filter"):
            return flight.FlightInfo(schema, descriptor, endpoints, -1, -1)  # unknown
        width = _row_bytes(schema)
        total_bytes = info.rows * width if width is not None else -1
        return flight.FlightInfo(schema, descriptor, endpoints, info.rows, total_bytes)

    # --- reads -------------------------------------------------------------------------------

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.FlightDataStream:
        with flight_errors(), self._reading():
            shard = shard_ticket(ticket.ticket)
            info = self.catalog.describe(shard.dataset, shard.version)
            shard.version = info.version
            table = self.catalog.read_shard(info, shard.shard, prep_of(shard, info))
            arranged = arrange(table, shard)
            # A reader over the generator, not GeneratorStream: only the former sends the
            # dictionaries of categorical columns.
            batches = self._stream(arranged, shard, table)
            return flight.RecordBatchStream(
                pa.RecordBatchReader.from_batches(arranged.schema, batches)
            )

    def _reading(self) -> AbstractContextManager[object]:
        """A read preparing or streaming here, which queued write-throughs wait for."""
        return nullcontext() if self.write_through is None else self.write_through.streaming()

    def _stream(
        self, arranged: pa.Table, ticket: data_pb2.ShardTicket, prepared: pa.Table
    ) -> Iterator[pa.RecordBatch]:
        # A stream with dictionary columns must carry a batch for the reader to get the
        # dictionaries, so an empty shard (or a resume past the end) sends one empty batch.
        batches = arranged.to_batches(max_chunksize=_batch_rows(arranged)) or [
            pa.RecordBatch.from_pylist([], schema=arranged.schema)
        ]
        with self._reading():
            yield from batches
        if self.write_through is not None:
            # Only after the last batch went out: the write-through never delays the response.
            self.write_through.submit(ticket, prepared)

    # --- ingest ------------------------------------------------------------------------------

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        with flight_errors():
            request = ingest_request(descriptor)
            if request.source:
                raise InvalidArgument("DoPut streams its data: a source is for the ingest action")
            schema = put_schema(reader)
            info = self._ingest(request, schema, put_batches(reader, self.max_batch_bytes))
            writer.write(pa.py_buffer(info_to_pb(info).SerializeToString()))

    def _ingest(
        self,
        request: data_pb2.IngestRequest,
        schema: pa.Schema,
        batches: Iterator[pa.RecordBatch],
    ) -> DatasetInfo:
        return self.catalog.ingest(
            request.dataset,
            schema,
            batches,
            shards=request.shards,
            key=request.key,
            partitioning=partitioning_of(request),
            bounds=tuple(request.bounds),
            target=request.target,
            positive_class=request.positive_class,
        )

    def _ingest_source(self, body: bytes) -> bytes:
        request = parse_message(data_pb2.IngestRequest, body, "the ingest body")
        validate_name("dataset", request.dataset)
        if self.sources is None:
            raise InvalidArgument("this shard service reads no sources: stream the data by DoPut")
        reader = self.sources.open(request.source, request.format)
        info = self._ingest(request, reader.schema, iter(reader))
        return info_to_pb(info).SerializeToString()

    # --- actions -----------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[flight.ActionType]:
        return [flight.ActionType(name, doc) for name, doc in ACTIONS.items()]

    def do_action(
        self, context: flight.ServerCallContext, action: flight.Action
    ) -> Iterator[flight.Result]:
        with flight_errors():
            body = action.body.to_pybytes() if action.body is not None else b""
            if action.type == "describe":
                request = parse_message(data_pb2.DataRequest, body, "the describe body")
                info = self.catalog.describe(request.dataset, request.version)
                result = info_to_pb(info).SerializeToString()
            elif action.type == "list-datasets":
                response = data_pb2.ListDatasetsResponse(
                    datasets=[info_to_pb(info) for info in self.catalog.list()]
                )
                result = response.SerializeToString()
            elif action.type == "ingest":
                result = self._ingest_source(body)
            else:
                raise InvalidArgument(
                    f"unknown action {action.type!r}; actions: {', '.join(ACTIONS)}"
                )
            return iter([flight.Result(pa.py_buffer(result))])
