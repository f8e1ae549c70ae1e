"""The data plane's shared pieces: how a prepared shard is arranged for one read (shuffle by
(seed, epoch), resume offset), so the shard service and the cache serve identical rows; the
Flight edge's parsing of descriptors, tickets and DoPut streams, so every server reads them
alike; and `DataClient`, the Flight client of the shard service and the cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError, Message

from onehop.channels import flight_location, sync_channel
from onehop.dataset import file_format, first_line, open_batches
from onehop.errors import (
    InvalidArgument,
    NotFound,
    OnehopError,
    PayloadTooLarge,
    Unavailable,
    from_flight_error,
)
from onehop.keys import shard_key, validate_name
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, data_pb2

log = logging.getLogger(__name__)

# DoPut app_metadata by which a client abandons an ingest whose source failed mid-stream:
# Flight cannot cancel a DoPut, and a plain end of stream would publish a partial version.
INGEST_ABORT = b"onehop:abort-ingest"

M = TypeVar("M", bound=Message)
# Record batches of a table sent by `put_dataset`.
PUT_BATCH_BYTES = 4 << 20

# The shard service's Flight actions, which the gateway passes on unchanged.
ACTIONS = {
    "describe": "body = DataRequest bytes (dataset, version; 0 = newest) -> DatasetInfo bytes",
    "list-datasets": "no body -> ListDatasetsResponse bytes (newest version of each dataset)",
    "ingest": "body = IngestRequest bytes naming a source (a path under the shard service's "
    "source root, or an allowed URI) -> DatasetInfo bytes",
}


def epoch_permutation(rows: int, seed: int, epoch: int, salt: int = 0) -> np.ndarray:
    """A permutation of range(rows) that is a pure function of (seed, epoch, salt)."""
    return np.random.default_rng([seed, epoch, salt]).permutation(rows)


def arrange(table: pa.Table, ticket: data_pb2.ShardTicket) -> pa.Table:
    """The rows one ticket names: the prepared shard, shuffled when asked, from its offset."""
    if ticket.shuffle:
        table = table.take(
            pa.array(epoch_permutation(table.num_rows, ticket.seed, ticket.epoch, ticket.shard))
        )
    if ticket.offset:
        table = table.slice(min(ticket.offset, table.num_rows))
    return table


# --- the Flight edge: what clients send -----------------------------------------------------


def parse_message(message_type: type[M], data: bytes, what: str) -> M:
    """A message from Flight bytes (command, ticket, action body); garbage → InvalidArgument."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"{what} is not a serialized {message_type.DESCRIPTOR.full_name}"
        ) from None


def shard_ticket(data: bytes) -> data_pb2.ShardTicket:
    """A DoGet ticket (or a cache DoPut command) as the ShardTicket it must be."""
    ticket = parse_message(data_pb2.ShardTicket, data, "the ticket")
    validate_name("dataset", ticket.dataset)
    return ticket


def data_request(descriptor: flight.FlightDescriptor) -> data_pb2.DataRequest:
    """`for_path(name)`, `for_path(name, version)` (version "3" or "v3"; 0 = newest) or
    `for_command(DataRequest bytes)`."""
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        request = parse_message(
            data_pb2.DataRequest, descriptor.command, "the descriptor's command"
        )
    else:
        path = _path(descriptor)
        if len(path) not in (1, 2):
            raise InvalidArgument(
                f"a dataset path is [name] or [name, version], got {len(path)} elements"
            )
        request = data_pb2.DataRequest(dataset=path[0])
        if len(path) == 2:
            request.version = _version(path[1])
    validate_name("dataset", request.dataset)
    return request


def ingest_request(descriptor: flight.FlightDescriptor) -> data_pb2.IngestRequest:
    """`for_path(name)` or `for_command(IngestRequest bytes)`; the version is assigned."""
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        request = parse_message(
            data_pb2.IngestRequest, descriptor.command, "the descriptor's command"
        )
    else:
        path = _path(descriptor)
        if len(path) != 1:
            raise InvalidArgument("DoPut descriptor path must be [dataset]: versions are assigned")
        request = data_pb2.IngestRequest(dataset=path[0])
    validate_name("dataset", request.dataset)
    return request


def put_schema(reader: flight.MetadataRecordBatchReader) -> pa.Schema:
    """DoPut's schema: the stream's first message, which a client may have garbled."""
    try:
        return reader.schema
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(f"malformed Arrow IPC schema in DoPut: {first_line(exc)}") from None


def put_batches(
    reader: flight.MetadataRecordBatchReader, max_batch_bytes: int = 0
) -> Iterator[pa.RecordBatch]:
    """DoPut's batches, one at a time (never materialised). A client whose own source failed
    mid-stream sends INGEST_ABORT (a plain end of stream would look complete): fail, so
    nothing is published; a broken stream is the client's mistake. A batch over
    `max_batch_bytes` (0 = no limit) is refused: one batch is held whole in memory."""
    number = 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            # Arrow reports a malformed or misordered IPC message as OSError.
            raise InvalidArgument(
                f"malformed Arrow IPC stream in DoPut: {first_line(exc)}"
            ) from None
        if chunk.app_metadata is not None and chunk.app_metadata.to_pybytes() == INGEST_ABORT:
            raise InvalidArgument("the client abandoned the ingest; nothing was published")
        if chunk.data is not None:
            number += 1
            if max_batch_bytes and chunk.data.nbytes > max_batch_bytes:
                raise PayloadTooLarge(
                    f"batch {number} is {chunk.data.nbytes} bytes, over the limit of "
                    f"{max_batch_bytes}: send smaller record batches"
                )
            try:
                # Full validation (offsets, UTF-8, dictionary indices): a corrupt batch is
                # refused here rather than crashing a reader of the shard later.
                chunk.data.validate(full=True)
            except pa.ArrowInvalid as exc:
                raise InvalidArgument(f"corrupt record batch in DoPut: {first_line(exc)}") from None
            yield chunk.data


def _path(descriptor: flight.FlightDescriptor) -> list[str]:
    try:
        return [
            part.decode("utf-8") if isinstance(part, bytes) else str(part)
            for part in descriptor.path or []
        ]
    except UnicodeDecodeError:
        raise InvalidArgument("descriptor path is not UTF-8") from None


def _version(text: str) -> int:
    digits = text.removeprefix("v")
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidArgument(f"dataset version {text!r} is not a number")
    version = int(digits)
    if version >= 2**32:
        raise InvalidArgument(f"dataset version {version} is out of range")
    return version


class DataClient:
    """The data plane's client (sync, thread-safe): plans that put the cache first, reads
    that fall back from one location to the next, ingest by Flight DoPut.

    Used by the gateway's Flight server and by the trainer. `settings.shard_address` is the
    shard service's Flight host:port; `cache_address` (cache gRPC) and
    `cache_flight_address` may be empty (no cache).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.shard_location = (
            flight.Location(flight_location(settings.shard_address))
            if settings.shard_address
            else None
        )
        self.cache_location = (
            flight.Location(flight_location(settings.cache_flight_address))
            if settings.cache_flight_address
            else None
        )
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()
        self._cache_channel = (
            sync_channel(settings.cache_address, settings) if settings.cache_address else None
        )
        self._cache = cache_pb2_grpc.CacheStub(self._cache_channel) if self._cache_channel else None

    # --- connections -----------------------------------------------------------------------

    def _client(self, location: flight.Location | str) -> flight.FlightClient:
        uri = location.uri.decode() if isinstance(location, flight.Location) else location
        if uri.startswith("arrow-flight-reuse-connection:"):
            # Flight's "the server that sent this plan": ours is the shard service.
            uri = self._shard_location().uri.decode()
        with self._lock:
            client = self._clients.get(uri)
            if client is None:
                client = self._clients[uri] = flight.connect(uri)
            return client

    @property
    def _shard(self) -> flight.FlightClient:
        return self._client(self._shard_location())

    def _shard_location(self) -> flight.Location:
        if self.shard_location is None:
            raise Unavailable("no shard service configured: set ONEHOP_SHARD_ADDRESS")
        return self.shard_location

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        if self._cache_channel is not None:
            self._cache_channel.close()

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- control -----------------------------------------------------------------------------

    def action(self, kind: str, body: bytes = b"") -> bytes:
        """One shard service action's result (see ACTIONS)."""
        return run_action(self._shard, kind, body)

    def describe(self, dataset: str, version: int = 0) -> data_pb2.DatasetInfo:
        body = data_pb2.DataRequest(dataset=dataset, version=version).SerializeToString()
        return data_pb2.DatasetInfo.FromString(self.action("describe", body))

    def list_datasets(self) -> list[data_pb2.DatasetInfo]:
        response = data_pb2.ListDatasetsResponse.FromString(self.action("list-datasets"))
        return list(response.datasets)

    # --- plan and read -----------------------------------------------------------------------

    def plan(self, request: data_pb2.DataRequest) -> flight.FlightInfo:
        """The shard service's plan with each cached shard's cache location put first."""
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        try:
            info = self._shard.get_flight_info(descriptor)
        except (flight.FlightError, pa.ArrowException) as exc:
            raise from_flight_error(exc) from None
        endpoints = list(info.endpoints)
        cached = self._cached([e.ticket.ticket for e in endpoints])
        planned = [
            flight.FlightEndpoint(
                endpoint.ticket,
                [self.cache_location, *(endpoint.locations or [self._shard_location()])]
                if hit and self.cache_location is not None
                else list(endpoint.locations or [self._shard_location()]),
            )
            for endpoint, hit in zip(endpoints, cached, strict=True)
        ]
        return flight.FlightInfo(
            info.schema, info.descriptor, planned, info.total_records, info.total_bytes
        )

    def _cached(self, tickets: list[bytes]) -> list[bool]:
        """One batched Contains for every ticket's shard key; a cache that is down, slow or
        not configured holds nothing."""
        if self._cache is None or self.cache_location is None or not tickets:
            return [False] * len(tickets)
        keys = [shard_key(data_pb2.ShardTicket.FromString(t)) for t in tickets]
        try:
            response = self._cache.Contains(
                cache_pb2.ContainsRequest(keys=keys),
                timeout=self.settings.cache_timeout_seconds,
            )
        except grpc.RpcError as exc:
            log.debug("cache Contains failed (%s); planning without the cache", exc.code())
            return [False] * len(tickets)
        found = list(response.found)
        return found if len(found) == len(keys) else [False] * len(keys)

    def read(self, endpoint: flight.FlightEndpoint) -> pa.Table:
        """The endpoint's rows from its first location that has them.

        Any failure at one location (NOT_FOUND from a cache that lost the entry, a node
        that is down) moves on to the next; when all fail, the last one's domain error is
        raised (the shard service's, which is listed last).
        """
        locations = list(endpoint.locations) or [self._shard_location()]
        error: OnehopError | None = None
        for location in locations:
            try:
                return self._client(location).do_get(endpoint.ticket).read_all()
            except (flight.FlightError, pa.ArrowException) as exc:
                error = from_flight_error(exc)
                log.debug("read at %s failed: %s", location, error.message)
        assert error is not None
        raise error

    def open(self, endpoint: flight.FlightEndpoint) -> flight.FlightStreamReader:
        """A stream of the endpoint's rows from the first location that starts one (its
        schema arrived): the same fallback as `read`, without holding the rows."""
        locations = list(endpoint.locations) or [self._shard_location()]
        error: OnehopError | None = None
        for location in locations:
            try:
                stream = self._client(location).do_get(endpoint.ticket)
                stream.schema  # noqa: B018 - waits for the first message: errors surface here
                return stream
            except (flight.FlightError, pa.ArrowException) as exc:
                error = from_flight_error(exc)
                log.debug("read at %s failed: %s", location, error.message)
        assert error is not None
        raise error

    def endpoint_for(self, ticket: bytes) -> flight.FlightEndpoint:
        """Where a bare ticket is redeemed: the cache when it holds the shard, then the
        shard service (one Contains, as a plan would do)."""
        shard = self._shard_location()
        cached = self.cache_location is not None and self._cached([ticket])[0]
        return flight.FlightEndpoint(ticket, [self.cache_location, shard] if cached else [shard])

    # --- ingest ------------------------------------------------------------------------------

    def ingest_file(
        self, path: Path, request: data_pb2.IngestRequest, name: str = ""
    ) -> data_pb2.DatasetInfo:
        """A local file streamed to the shard service as a new version (see `put_file`)."""
        return put_file(self._shard, path, request, name)

    def ingest(
        self,
        name: str,
        batches: Iterable[pa.RecordBatch] | pa.RecordBatchReader | pa.Table,
        schema: pa.Schema | None = None,
        shards: int = 0,
        key: str = "",
        options: data_pb2.IngestRequest | None = None,
    ) -> data_pb2.DatasetInfo:
        """Stream `batches` to the shard service as a new version of `name` (Flight DoPut)."""
        return put_dataset(self._shard, name, batches, schema, shards, key, options)


def put_dataset(
    client: flight.FlightClient,
    name: str,
    batches: Iterable[pa.RecordBatch] | pa.RecordBatchReader | pa.Table,
    schema: pa.Schema | None = None,
    shards: int = 0,
    key: str = "",
    options: data_pb2.IngestRequest | None = None,
) -> data_pb2.DatasetInfo:
    """Ingest by Flight DoPut at a shard service or a gateway: the new version's DatasetInfo.

    `options` carries the other IngestRequest fields (partitioning, bounds, target...);
    `name`, and `shards` and `key` when given, take precedence over its own.
    When the source fails mid-stream the server is told (INGEST_ABORT) so it publishes
    nothing, and the source's own error is raised.
    """
    if isinstance(batches, pa.Table):
        schema = schema or batches.schema
        # Messages of a few MiB: under any server's batch limit, and streamed, not one blob.
        row_bytes = max(1, batches.nbytes // max(1, batches.num_rows))
        batches = batches.to_batches(max_chunksize=max(1, PUT_BATCH_BYTES // row_bytes))
    elif isinstance(batches, pa.RecordBatchReader):
        schema = schema or batches.schema
    if schema is None:
        raise InvalidArgument("ingest needs the input's schema")
    command = data_pb2.IngestRequest()
    if options is not None:
        command.CopyFrom(options)
    command.dataset = name
    command.shards = shards or command.shards
    command.key = key or command.key
    descriptor = flight.FlightDescriptor.for_command(command.SerializeToString())
    source = iter(batches)
    source_failed = False
    writer = None
    try:
        writer, results = client.do_put(descriptor, schema)
        while True:
            try:
                batch = next(source)
            except StopIteration:
                break
            except BaseException:
                # Our own source failed (a bad file, an interrupt): tell the server so
                # it publishes nothing, then raise the source's error as it is.
                source_failed = True
                _abandon(writer)
                raise
            writer.write_batch(batch)
        writer.done_writing()
        metadata = results.read()
        writer.close()
    except (flight.FlightError, pa.ArrowException) as exc:
        if source_failed:
            raise
        # Once the server failed the stream, close() reports the server's status.
        raise from_flight_error(_close_error(writer) or exc) from None
    if metadata is None:
        raise Unavailable("the server sent no result for the ingest")
    return data_pb2.DatasetInfo.FromString(metadata.to_pybytes())


def run_action(client: flight.FlightClient, kind: str, body: bytes = b"") -> bytes:
    """The result of one of ACTIONS at a shard service or a gateway."""
    try:
        results = list(client.do_action(flight.Action(kind, body)))
    except (flight.FlightError, pa.ArrowException) as exc:
        raise from_flight_error(exc) from None
    if not results:
        raise Unavailable(f"the server sent no result for {kind!r}")
    return results[0].body.to_pybytes()


def put_file(
    client: flight.FlightClient, path: Path, request: data_pb2.IngestRequest, name: str = ""
) -> data_pb2.DatasetInfo:
    """A CSV, Parquet or Arrow IPC file (format: `request.format`, else the extension of
    `name or path`) streamed by DoPut as a new version of `request.dataset`; errors in the
    file are InvalidArgument naming `name or path` and the row or column."""
    shown = name or path.name
    format = file_format(shown, request.format)
    try:
        source = pa.OSFile(str(path))
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    with source:
        reader = open_batches(source, format, shown)
        return put_dataset(client, request.dataset, reader, options=request)


def _abandon(writer: flight.FlightStreamWriter) -> None:
    try:
        writer.write_metadata(pa.py_buffer(INGEST_ABORT))
        writer.close()
    except Exception:  # the server reports the abandoned ingest as an error: expected
        pass


def _close_error(writer: flight.FlightStreamWriter | None) -> BaseException | None:
    if writer is None:
        return None
    try:
        writer.close()
    except Exception as exc:  # the server's own status, when the stream failed
        return exc
    return None
