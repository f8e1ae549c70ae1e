"""The gateway's Arrow Flight front: the data plane for clients that hold only the gateway's
address, with no onehop code on their side.

`GetFlightInfo` is the cache-aware planner: each endpoint keeps its direct locations (the
cache node that holds the shard first, the shard service last), so a client redeems every
ticket at the inner service in one hop. `DoGet` here proxies for clients that cannot reach
the inner services; `DoPut` ingests a new dataset version, streamed through to the shard
service. Handlers run on Flight's threads (sync) and end inside `flight_errors()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from onehop.dataplane import DataClient, data_request, ingest_request, put_batches
from onehop.errors import InvalidArgument, flight_errors
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2


class GatewayFlightServer(flight.FlightServerBase):
    """Listens from construction on `settings.host:settings.gateway_flight_port` (0 = any;
    read `.port`). Stop with `.shutdown()` from another thread."""

    def __init__(self, settings: Settings, data: DataClient, **kwargs: Any):
        super().__init__(f"grpc+tcp://{settings.host}:{settings.gateway_flight_port}", **kwargs)
        self.settings = settings
        self._data = data

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        """One FlightInfo per dataset (newest version); criteria = a name prefix."""
        with flight_errors():
            prefix = (criteria or b"").decode("utf-8", errors="replace")
            datasets = [d for d in self._data.list_datasets() if d.name.startswith(prefix)]
        for dataset in datasets:
            with flight_errors():
                info = self._data.plan(
                    data_pb2.DataRequest(dataset=dataset.name, version=dataset.version)
                )
            yield info

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        with flight_errors():
            return self._data.plan(data_request(descriptor))

    def get_schema(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        with flight_errors():
            return flight.SchemaResult(self._data.plan(data_request(descriptor)).schema)

    def do_get(self, context: Any, ticket: flight.Ticket) -> Any:
        """The proxy path (2 hops): fetch the shard where the ticket's plan put it."""
        with flight_errors():
            if not ticket.ticket:
                raise InvalidArgument("empty ticket: use one from GetFlightInfo's endpoints")
            table = self._data.read_ticket(ticket.ticket)
            return flight.RecordBatchStream(table)

    def do_put(
        self,
        context: Any,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        """Ingest: the upload streams through to the shard service batch by batch (an abandoned
        upload is passed on, so nothing is published); the new version's DatasetInfo comes back
        as the PutResult's app_metadata."""
        with flight_errors():
            request = ingest_request(descriptor)
            info = self._data.ingest(
                request.dataset,
                put_batches(reader),
                reader.schema,
                shards=request.shards,
                key=request.key,
            )
            writer.write(pa.py_buffer(info.SerializeToString()))
