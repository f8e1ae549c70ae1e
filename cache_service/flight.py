"""Arrow Flight over the cache's store: `DoPut` writes a prepared shard through, `DoGet`
serves it arranged for the ticket (shuffle by seed/epoch, resume offset) — or NOT_FOUND, and
the client moves on to the next location of the endpoint (DESIGN §2).

`DoGet` sends a shard without copying it: the record batches are views into LMDB's memory
map (the stored value is an uncompressed Arrow IPC stream), and the read transaction that
keeps them valid is held by the Arrow buffer they share, so it lasts exactly as long as
Flight holds any batch of the stream — to its end, or until the client goes away.

`DoAction("BatchGet")` is the cache's `BatchGet` on Flight's C++ gRPC server: the same
request and (packed) answer messages as `onehop.v1.Cache/BatchGet`, at a fraction of the
per-call CPU of the Python gRPC server, for clients on the hit path
(`cache_service.client.flight_batch_get`). `DoAction("Contains")` is `onehop.v1.Cache/
Contains` the same way, for the Flight planner (`onehop.dataplane.DataClient`), which then
asks a node what it holds over the connection it reads from."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from cache_service.store import CacheStore
from onehop.dataplane import (
    CONTAINS_ACTION,
    PUT_BATCH_BYTES,
    arrange,
    parse_message,
    shard_ticket,
)
from onehop.errors import InvalidArgument, NotFound, Unimplemented, flight_errors
from onehop.keys import shard_key
from protos.onehop.v1 import cache_pb2, data_pb2

log = logging.getLogger(__name__)

BATCH_GET_ACTION = "BatchGet"
# Record batches are stored (and so sent) at most this big: a few MiB per Flight message.
BATCH_BYTES = PUT_BATCH_BYTES


def _describe(ticket: data_pb2.ShardTicket) -> str:
    return f"{ticket.dataset} v{ticket.version} shard {ticket.shard}"


class CacheFlightServer(flight.FlightServerBase):
    """Listens from construction (read `.port`); stop with `shutdown()`. Handlers run on
    Flight's own threads, so they call the store directly."""

    def __init__(self, store: CacheStore, location: str, **kwargs: Any):
        super().__init__(location, **kwargs)
        self._store = store

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        with flight_errors():
            if descriptor.descriptor_type != flight.DescriptorType.CMD:
                raise InvalidArgument(
                    "cache DoPut needs FlightDescriptor.for_command(<onehop.v1.ShardTicket bytes>)"
                )
            ticket = shard_ticket(descriptor.command)
            sink = pa.BufferOutputStream()
            try:
                # Re-encode batch by batch as they arrive: one IPC stream, no table in between.
                with pa.ipc.new_stream(sink, reader.schema) as ipc:
                    for chunk in reader:
                        for batch in _pieces(chunk.data):
                            ipc.write_batch(batch)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                log.info("rejected Arrow stream for %s: %s", _describe(ticket), exc)
                raise InvalidArgument(
                    f"malformed Arrow IPC stream for {_describe(ticket)}: send one schema "
                    "and record batches that match it"
                ) from None
            self._store.put(shard_key(ticket), memoryview(sink.getvalue()))

    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> list[Any]:
        """The cache lists nothing: what it holds is addressed by tickets from a plan."""
        return []

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        with flight_errors():
            raise Unimplemented(
                "the cache does not plan reads: ask the gateway (GetFlightInfo), then redeem "
                "its tickets here"
            )

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [
            (
                BATCH_GET_ACTION,
                "body: onehop.v1.BatchGetRequest; results: a onehop.v1.BatchGetResponse with "
                "found and sizes, then the values found, back to back",
            ),
            (
                CONTAINS_ACTION,
                "body: onehop.v1.ContainsRequest; result: a onehop.v1.ContainsResponse",
            ),
        ]

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> list[Any]:
        with flight_errors():
            if action.type == CONTAINS_ACTION:
                body = action.body.to_pybytes()
                keys = parse_message(cache_pb2.ContainsRequest, body, "the Contains body").keys
                found = cache_pb2.ContainsResponse(found=self._store.contains_many(keys))
                return [found.SerializeToString()]
            if action.type != BATCH_GET_ACTION:
                raise InvalidArgument(
                    f"unknown cache action {action.type!r}: the cache serves "
                    f"{BATCH_GET_ACTION!r} and {CONTAINS_ACTION!r}"
                )
            request = parse_message(
                cache_pb2.BatchGetRequest, action.body.to_pybytes(), "the BatchGet body"
            )
            packed = self._store.get_packed(request.keys)
            header = cache_pb2.BatchGetResponse(found=packed.found, sizes=packed.sizes)
            # Built here, not in a generator: errors must leave through flight_errors. The
            # values travel as their own result, so neither side copies them into a message.
            return [header.SerializeToString(), pa.py_buffer(packed.data)]

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.RecordBatchStream:
        with flight_errors():
            shard = shard_ticket(ticket.ticket)
            key = shard_key(shard)
            pinned = self._store.get_pinned(key)
            if pinned is None:
                raise NotFound(f"shard not cached: {_describe(shard)}")
            view = pinned.view
            # The buffer owns `pinned`: the read transaction ends when Arrow lets go of the
            # last batch (stream done, client gone), never while one is being sent.
            buffer = pa.foreign_buffer(pa.py_buffer(view).address, len(view), base=pinned)
            try:
                table = pa.ipc.open_stream(buffer).read_all()
            except pa.ArrowInvalid:
                # Checksummed, so a writer stored bad IPC: drop it and send the client on.
                pinned.release()
                log.warning("undecodable cached shard %s: removed", _describe(shard))
                self._store.delete_many([key])
                raise NotFound(f"shard not cached: {_describe(shard)}") from None
            return flight.RecordBatchStream(arrange(table, shard))


def _pieces(batch: pa.RecordBatch) -> list[pa.RecordBatch]:
    """`batch` cut (zero-copy) into slices of at most about BATCH_BYTES."""
    if batch.nbytes <= BATCH_BYTES or batch.num_rows <= 1:
        return [batch]
    rows = max(1, batch.num_rows * BATCH_BYTES // batch.nbytes)
    return [batch.slice(start, rows) for start in range(0, batch.num_rows, rows)]
