"""Arrow Flight over the cache's store: `DoPut` writes a prepared shard through, `DoGet`
serves it arranged for the ticket (shuffle by seed/epoch, resume offset) — or NOT_FOUND, and
the client moves on to the next location of the endpoint (DESIGN §2)."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from cache_service.store import CacheStore
from onehop.dataplane import arrange, shard_ticket
from onehop.errors import InvalidArgument, NotFound, flight_errors
from onehop.keys import shard_key
from protos.onehop.v1 import data_pb2

log = logging.getLogger(__name__)


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
                        ipc.write_batch(chunk.data)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                log.info("rejected Arrow stream for %s: %s", _describe(ticket), exc)
                raise InvalidArgument(
                    f"malformed Arrow IPC stream for {_describe(ticket)}: send one schema "
                    "and record batches that match it"
                ) from None
            self._store.put(shard_key(ticket), memoryview(sink.getvalue()))

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.RecordBatchStream:
        with flight_errors():
            shard = shard_ticket(ticket.ticket)
            key = shard_key(shard)
            payload = self._store.get(key)
            if payload is None:
                raise NotFound(f"shard not cached: {_describe(shard)}")
            try:
                # Zero-copy: the batches point into `payload`.
                table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
            except pa.ArrowInvalid:
                # Checksummed, so a writer stored bad IPC: drop it and send the client on.
                log.warning("undecodable cached shard %s: removed", _describe(shard))
                self._store.delete_many([key])
                raise NotFound(f"shard not cached: {_describe(shard)}") from None
            return flight.RecordBatchStream(arrange(table, shard))
