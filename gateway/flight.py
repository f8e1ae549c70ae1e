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
from google.protobuf.message import DecodeError

from onehop.dataplane import INGEST_ABORT, DataClient
from onehop.errors import InvalidArgument, flight_errors
from onehop.keys import validate_name
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
        """Ingest: the upload streams through to the shard service batch by batch; the new
        version's DatasetInfo comes back as the PutResult's app_metadata."""
        with flight_errors():
            request = ingest_request(descriptor)
            info = self._data.ingest(
                request.dataset,
                _batches(reader),
                reader.schema,
                shards=request.shards,
                key=request.key,
            )
            writer.write(pa.py_buffer(info.SerializeToString()))


def data_request(descriptor: flight.FlightDescriptor) -> data_pb2.DataRequest:
    """`for_path(name)`, `for_path(name, version)` or `for_command(DataRequest bytes)`."""
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        request = _parse(data_pb2.DataRequest, descriptor.command, "onehop.v1.DataRequest")
    else:
        path = _path(descriptor)
        if len(path) not in (1, 2):
            raise InvalidArgument("descriptor path must be [dataset] or [dataset, version]")
        request = data_pb2.DataRequest(dataset=path[0])
        if len(path) == 2:
            if not path[1].isdigit() or int(path[1]) >= 1 << 32:
                raise InvalidArgument(f"dataset version {path[1]!r} is not a version number")
            request.version = int(path[1])
    validate_name("dataset", request.dataset)
    return request


def ingest_request(descriptor: flight.FlightDescriptor) -> data_pb2.IngestRequest:
    """`for_path(name)` or `for_command(IngestRequest bytes)`; the version is assigned."""
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        request = _parse(data_pb2.IngestRequest, descriptor.command, "onehop.v1.IngestRequest")
    else:
        path = _path(descriptor)
        if len(path) != 1:
            raise InvalidArgument("DoPut descriptor path must be [dataset]: versions are assigned")
        request = data_pb2.IngestRequest(dataset=path[0])
    validate_name("dataset", request.dataset)
    return request


def _path(descriptor: flight.FlightDescriptor) -> list[str]:
    try:
        return [
            part.decode("utf-8") if isinstance(part, bytes) else str(part)
            for part in descriptor.path or []
        ]
    except UnicodeDecodeError:
        raise InvalidArgument("descriptor path is not UTF-8") from None


def _parse(cls: Any, data: bytes, what: str) -> Any:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise InvalidArgument(f"descriptor command is not a serialized {what}") from None


def _batches(reader: flight.MetadataRecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The client's upload, one record batch at a time (never materialised); a broken
    stream is the client's mistake, not ours."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise InvalidArgument("malformed Arrow IPC stream in DoPut") from exc
        if chunk.app_metadata is not None and chunk.app_metadata.to_pybytes() == INGEST_ABORT:
            # Passed on, so the shard service publishes nothing either.
            raise InvalidArgument("the client abandoned the ingest; nothing was published")
        if chunk.data is not None:
            yield chunk.data
