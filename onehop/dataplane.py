"""The data plane's shared pieces: how a prepared shard is arranged for one read (shuffle by
(seed, epoch), resume offset), so the shard service and the cache serve identical rows; the
Flight edge's parsing of descriptors, tickets and DoPut streams, so every server reads them
alike; `flight_client`, a Flight connection with the TLS and token of the settings; and
`DataClient`, the Flight client of the shard service and the cache nodes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError, Message

from onehop.channels import (
    auth_metadata,
    flight_client_options,
    flight_location,
    split_addresses,
)
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
from protos.onehop.v1 import cache_pb2, data_pb2

log = logging.getLogger(__name__)

# DoPut app_metadata by which a client abandons an ingest whose source failed mid-stream:
# Flight cannot cancel a DoPut, and a plain end of stream would publish a partial version.
INGEST_ABORT = b"onehop:abort-ingest"

M = TypeVar("M", bound=Message)
T = TypeVar("T")
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


def flight_client(location: flight.Location | str, settings: Settings) -> flight.FlightClient:
    """A Flight client of a onehop service, secured as the gRPC channels are: TLS with the CA
    from settings, the process's certificate under mTLS, and the bearer token on every call
    (a client middleware, so no call can forget it). `location` comes from a plan or from
    `onehop.channels.flight_location(address, settings)`."""
    headers = dict(auth_metadata(settings))
    middleware = [_HeadersFactory(headers)] if headers else None
    return flight.connect(location, middleware=middleware, **flight_client_options(settings))


class _HeadersFactory(flight.ClientMiddlewareFactory):  # type: ignore[misc]
    def __init__(self, headers: dict[str, str]):
        super().__init__()
        self._middleware = _Headers(headers)

    def start_call(self, info: Any) -> flight.ClientMiddleware:
        return self._middleware


class _Headers(flight.ClientMiddleware):  # type: ignore[misc]
    def __init__(self, headers: dict[str, str]):
        super().__init__()
        self._headers = headers

    def sending_headers(self) -> dict[str, str]:
        return self._headers


@dataclass(frozen=True)
class CacheNodes:
    """The cache nodes of the data plane, in the order of ONEHOP_CACHE_ADDRESS.

    A node's name is its gRPC address, as `cache_service.client.CacheClient` knows it, so
    the gateway's predictions, its plans and the shard service's write-through place a key
    on the same node (`cache_service.client.node_for`). ONEHOP_CACHE_FLIGHT_ADDRESS lists
    the nodes' Flight addresses in the same order, one per node. With no gRPC address, a
    single Flight address is a node of its own, named by it.
    """

    names: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> CacheNodes:
        names = split_addresses(settings.cache_address)
        addresses = split_addresses(settings.cache_flight_address)
        if not addresses:
            return cls()
        if not names and len(addresses) == 1:
            return cls(tuple(addresses), tuple(addresses))
        if len(names) != len(addresses):
            raise ValueError(
                f"ONEHOP_CACHE_FLIGHT_ADDRESS lists {len(addresses)} Flight addresses for the "
                f"{len(names)} cache nodes of ONEHOP_CACHE_ADDRESS: list one per node, in the "
                "same order"
            )
        return cls(tuple(names), tuple(addresses))

    def __bool__(self) -> bool:
        return bool(self.names)

    def place(self, key: bytes) -> int:
        """The index of the node that holds `key` (`cache_service.client.node_for`)."""
        if len(self.names) == 1:
            return 0
        from cache_service.client import node_for  # cache_service imports this module

        return self.names.index(node_for(key, self.names))


# The cache's Flight action by which a planner asks a node which keys it holds
# (`cache_service.flight`): body a ContainsRequest, one result, a ContainsResponse.
CONTAINS_ACTION = "Contains"
# A cache node that failed to answer is planned without for this long (then asked again).
_CACHE_DOWN_SECONDS = 1.0


class DataClient:
    """The data plane's client (sync, thread-safe): plans that put the cache first, reads
    that fall back from one location to the next, ingest by Flight DoPut.

    Used by the gateway's Flight server and by the trainer. `settings.shard_address` is the
    shard service's Flight host:port; `cache_address` (cache gRPC, one or several nodes) and
    `cache_flight_address` (their Flight addresses, same order) may be empty (no cache).
    Every connection uses the TLS and token settings.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.shard_location = (
            flight.Location(flight_location(settings.shard_address, settings))
            if settings.shard_address
            else None
        )
        self.cache_nodes = CacheNodes.from_settings(settings)
        self._cache_locations = [
            flight.Location(flight_location(address, settings))
            for address in self.cache_nodes.addresses
        ]
        self._cache_options = flight.FlightCallOptions(timeout=settings.cache_timeout_seconds)
        self._cache_down_until = [0.0] * len(self._cache_locations)
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    # --- connections -----------------------------------------------------------------------

    def _client(self, location: flight.Location | str) -> flight.FlightClient:
        uri = location.uri.decode() if isinstance(location, flight.Location) else location
        if uri.startswith("arrow-flight-reuse-connection:"):
            # Flight's "the server that sent this plan": ours is the shard service.
            uri = self._shard_location().uri.decode()
        with self._lock:
            client = self._clients.get(uri)
            if client is None:
                client = self._clients[uri] = flight_client(uri, self.settings)
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
        """The shard service's plan with each cached shard's cache node put first."""
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        try:
            info = self._shard.get_flight_info(descriptor)
        except (flight.FlightError, pa.ArrowException) as exc:
            raise from_flight_error(exc) from None
        if not self._cache_locations:
            return info
        endpoints = info.endpoints
        holders = self._cached([endpoint.ticket.ticket for endpoint in endpoints])
        if not any(holders):
            return info
        planned = [
            flight.FlightEndpoint(endpoint.ticket, [holder, *endpoint.locations])
            if holder is not None
            else endpoint
            for endpoint, holder in zip(endpoints, holders, strict=True)
        ]
        return flight.FlightInfo(
            info.schema, info.descriptor, planned, info.total_records, info.total_bytes
        )

    def _cached(self, tickets: list[bytes]) -> list[flight.Location | None]:
        """For each ticket, the Flight location of the cache node that holds its shard, or
        None: one batched Contains per node (the cache's Flight action, over the connection
        reads use). A node that is down, slow or not configured holds nothing, and is not
        asked again for a second."""
        found: list[flight.Location | None] = [None] * len(tickets)
        if not self._cache_locations or not tickets:
            return found
        keys = [shard_key(data_pb2.ShardTicket.FromString(ticket)) for ticket in tickets]
        by_node: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            by_node.setdefault(self.cache_nodes.place(key), []).append(index)
        for node, indexes in by_node.items():
            if self._cache_down_until[node] > time.monotonic():
                continue
            location = self._cache_locations[node]
            request = cache_pb2.ContainsRequest(keys=[keys[i] for i in indexes])
            action = flight.Action(CONTAINS_ACTION, request.SerializeToString())
            try:
                (result,) = self._client(location).do_action(action, self._cache_options)
                hits = cache_pb2.ContainsResponse.FromString(result.body.to_pybytes()).found
            except (flight.FlightError, pa.ArrowException, ValueError) as exc:
                self._cache_down_until[node] = time.monotonic() + _CACHE_DOWN_SECONDS
                log.debug("cache %s Contains failed (%s): planned without it", location, exc)
                continue
            if len(hits) != len(indexes):
                continue
            for index, hit in zip(indexes, hits, strict=True):
                if hit:
                    found[index] = location
        return found

    def read(self, endpoint: flight.FlightEndpoint) -> pa.Table:
        """The endpoint's rows from its first location that has them.

        Any failure at one location (NOT_FOUND from a cache that lost the entry, a node
        that is down) moves on to the next; when all fail, the last one's domain error is
        raised (the shard service's, which is listed last).
        """
        return self._redeem(endpoint, flight.FlightStreamReader.read_all)

    def open(self, endpoint: flight.FlightEndpoint) -> flight.FlightStreamReader:
        """A stream of the endpoint's rows from the first location that starts one (its
        schema arrived): the same fallback as `read`, without holding the rows."""
        return self._redeem(endpoint, _started)

    def _redeem(
        self, endpoint: flight.FlightEndpoint, use: Callable[[flight.FlightStreamReader], T]
    ) -> T:
        """`use` of the endpoint's stream at its first location where it succeeds."""
        locations = list(endpoint.locations) or [self._shard_location()]
        error: OnehopError | None = None
        for location in locations:
            try:
                return use(self._client(location).do_get(endpoint.ticket))
            except (flight.FlightError, pa.ArrowException) as exc:
                error = from_flight_error(exc)
                log.debug("read at %s failed: %s", location, error.message)
        assert error is not None
        raise error

    def endpoint_for(self, ticket: bytes) -> flight.FlightEndpoint:
        """Where a bare ticket is redeemed: the cache when it holds the shard, then the
        shard service (one Contains, as a plan would do)."""
        shard = self._shard_location()
        (holder,) = self._cached([ticket])
        return flight.FlightEndpoint(ticket, [shard] if holder is None else [holder, shard])

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


def _started(stream: flight.FlightStreamReader) -> flight.FlightStreamReader:
    stream.schema  # noqa: B018 - waits for the first message: errors surface here
    return stream


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
