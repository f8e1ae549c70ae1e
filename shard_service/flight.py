"""The shard service's Arrow Flight edge: ingest (DoPut), plans (GetFlightInfo), shard reads
(DoGet) with write-through to the cache, and the describe/list actions.

Descriptors: `for_path(name)`, `for_path(name, version)` or `for_command(<DataRequest>)`;
DoPut also takes `for_command(<IngestRequest>)`. Tickets are `ShardTicket` bytes.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from onehop.channels import flight_location
from onehop.dataplane import INGEST_ABORT, arrange, epoch_permutation
from onehop.errors import InvalidArgument, flight_errors
from onehop.keys import shard_key
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2
from shard_service.catalog import Catalog, DatasetInfo
from shard_service.convert import info_to_pb, parse, prep_of, ticket_for

log = logging.getLogger(__name__)

# Rows per record batch on the wire: big enough to amortise per-message cost, small enough
# to stay far below gRPC message limits for wide tables.
STREAM_BATCH_ROWS = 64 * 1024
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}

ACTIONS = {
    "describe": "body = DataRequest bytes (dataset, version; 0 = newest) -> DatasetInfo bytes",
    "list-datasets": "no body -> ListDatasetsResponse bytes (newest version of each dataset)",
}


class WriteThrough:
    """Copies prepared shards to the cache's Flight DoPut, off the critical path.

    A queue bounded in entries and bytes feeds one background thread; when it is full the
    shard is dropped (the next miss will offer it again). Failures are logged and counted, never
    raised into a response.
    """

    _STOP = object()

    def __init__(
        self,
        address: str,
        max_pending: int,
        max_pending_bytes: int = 256 << 20,
        timeout_seconds: float = 30.0,
    ):
        self.address = address
        self.written = 0
        self.dropped = 0
        self.failed = 0
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

    def _run(self) -> None:
        client: flight.FlightClient | None = None
        while True:
            item = self._queue.get()
            if item is self._STOP:
                break
            key, ticket, table = item
            try:
                if client is None:
                    client = flight.connect(flight_location(self.address))
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
        if client is not None:
            client.close()

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued (up to `timeout`), then stop the thread."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)


class ShardFlightServer(flight.FlightServerBase):
    """Arrow Flight over a Catalog; it listens from construction (read `.port`)."""

    def __init__(
        self, catalog: Catalog, settings: Settings, write_through: WriteThrough | None = None
    ):
        super().__init__(flight_location(f"{settings.host}:{settings.shard_flight_port}"))
        self.catalog = catalog
        self.write_through = write_through
        host = settings.host
        if host in _WILDCARD_HOSTS:
            # Listening on every interface: advertise the configured address or our name.
            host = settings.shard_address.rpartition(":")[0] or socket.gethostname()
        self.address = f"{host}:{self.port}"
        self.location = flight.Location(flight_location(self.address))

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
            request = _data_request(descriptor)
            info = self.catalog.describe(request.dataset, request.version)
            return self._flight_info(descriptor, request, info)

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        with flight_errors():
            request = _data_request(descriptor)
            info = self.catalog.describe(request.dataset, request.version)
            return flight.SchemaResult(self.catalog.prepared_schema(info, prep_of(request)))

    def _flight_info(
        self,
        descriptor: flight.FlightDescriptor,
        request: data_pb2.DataRequest,
        info: DatasetInfo,
    ) -> flight.FlightInfo:
        schema = self.catalog.prepared_schema(info, prep_of(request))
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
        return flight.FlightInfo(schema, descriptor, endpoints, info.rows, info.bytes)

    # --- reads -------------------------------------------------------------------------------

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.FlightDataStream:
        with flight_errors():
            shard_ticket = parse(data_pb2.ShardTicket, ticket.ticket, "the ticket")
            if shard_ticket.version == 0:
                shard_ticket.version = self.catalog.describe(shard_ticket.dataset).version
            table = self.catalog.read_prepared(
                shard_ticket.dataset,
                shard_ticket.version,
                shard_ticket.shard,
                prep_of(shard_ticket),
            )
            arranged = arrange(table, shard_ticket)
            return flight.GeneratorStream(
                arranged.schema, self._stream(arranged, shard_ticket, table)
            )

    def _stream(
        self, arranged: pa.Table, ticket: data_pb2.ShardTicket, prepared: pa.Table
    ) -> Iterator[pa.RecordBatch]:
        yield from arranged.to_batches(max_chunksize=STREAM_BATCH_ROWS)
        # Only after the last batch went out: the write-through never delays the response.
        if self.write_through is not None:
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
            request = _ingest_request(descriptor)
            info = self.catalog.ingest(
                request.dataset,
                reader.schema,
                _put_batches(reader),
                shards=request.shards,
                key=request.key,
            )
            writer.write(pa.py_buffer(info_to_pb(info).SerializeToString()))

    # --- actions -----------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[flight.ActionType]:
        return [flight.ActionType(name, doc) for name, doc in ACTIONS.items()]

    def do_action(
        self, context: flight.ServerCallContext, action: flight.Action
    ) -> Iterator[flight.Result]:
        with flight_errors():
            if action.type == "describe":
                body = action.body.to_pybytes() if action.body is not None else b""
                request = parse(data_pb2.DataRequest, body, "the describe body")
                info = self.catalog.describe(request.dataset, request.version)
                result = info_to_pb(info).SerializeToString()
            elif action.type == "list-datasets":
                response = data_pb2.ListDatasetsResponse(
                    datasets=[info_to_pb(info) for info in self.catalog.list()]
                )
                result = response.SerializeToString()
            else:
                raise InvalidArgument(
                    f"unknown action {action.type!r}; actions: {', '.join(ACTIONS)}"
                )
            return iter([flight.Result(pa.py_buffer(result))])


def _put_batches(reader: flight.MetadataRecordBatchReader) -> Iterator[pa.RecordBatch]:
    """DoPut's batches. A client whose own source failed mid-stream sends INGEST_ABORT as
    app_metadata (a plain end of stream would look complete): the ingest then fails."""
    for chunk in reader:
        metadata = chunk.app_metadata
        if metadata is not None and metadata.to_pybytes() == INGEST_ABORT:
            raise InvalidArgument("the client abandoned the ingest: nothing was published")
        if chunk.data is not None:
            yield chunk.data


def _data_request(descriptor: flight.FlightDescriptor) -> data_pb2.DataRequest:
    """A descriptor as a DataRequest: path (name[, version]) or command (DataRequest bytes)."""
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        return parse(data_pb2.DataRequest, descriptor.command, "the descriptor's command")
    path = [part.decode() if isinstance(part, bytes) else part for part in descriptor.path or []]
    if not 1 <= len(path) <= 2:
        raise InvalidArgument(
            f"a dataset path is [name] or [name, version], got {len(path)} elements"
        )
    version = 0
    if len(path) == 2:
        try:
            version = int(path[1].removeprefix("v"))
        except ValueError:
            raise InvalidArgument(f"dataset version {path[1]!r} is not a number") from None
        if not 0 <= version < 2**32:
            raise InvalidArgument(f"dataset version {version} is out of range")
    return data_pb2.DataRequest(dataset=path[0], version=version)


def _ingest_request(descriptor: flight.FlightDescriptor) -> data_pb2.IngestRequest:
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        return parse(data_pb2.IngestRequest, descriptor.command, "the descriptor's command")
    path = [part.decode() if isinstance(part, bytes) else part for part in descriptor.path or []]
    if len(path) != 1:
        raise InvalidArgument("DoPut's descriptor path is [dataset name]")
    return data_pb2.IngestRequest(dataset=path[0])
