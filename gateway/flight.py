"""The gateway's Arrow Flight front: the data plane for clients that hold only the gateway's
address, with no onehop code on their side.

`GetFlightInfo` is the cache-aware planner: each endpoint keeps its direct locations (the
cache node that holds the shard first, the shard service last), so a client redeems every
ticket at the inner service in one hop. `DoGet` here proxies for clients that cannot reach
the inner services, batch by batch from the cache when it holds the shard, else the shard
service; `DoPut` ingests a new dataset version, streamed through to the shard service;
`DoAction` passes the shard service's actions on (describe, list-datasets, ingest of a
source). Handlers run on Flight's threads (sync) and end inside `flight_errors()`.
`upload_dataset` is the HTTP bridge's `POST /v1/datasets`: the same ingest, fed by a body.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from onehop.channels import flight_location
from onehop.dataplane import (
    ACTIONS,
    DataClient,
    data_request,
    ingest_request,
    put_batches,
    put_schema,
    shard_ticket,
)
from onehop.dataset import file_format
from onehop.errors import InvalidArgument, Unavailable, flight_errors, to_flight_error
from onehop.keys import validate_name
from onehop.server import flight_server_options
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2


def _answering(descriptor: flight.FlightDescriptor, info: flight.FlightInfo) -> flight.FlightInfo:
    """The plan with the client's own descriptor, as Flight clients expect it echoed."""
    return flight.FlightInfo(
        info.schema, descriptor, info.endpoints, info.total_records, info.total_bytes
    )


def _relay(upstream: flight.FlightStreamReader) -> Iterator[pa.RecordBatch]:
    """The upstream's batches; a cut upstream ends the client's stream with UNAVAILABLE (the
    client resumes its ticket from the rows it has, by offset)."""
    while True:
        try:
            chunk = upstream.read_chunk()
        except StopIteration:
            return
        except (flight.FlightError, pa.ArrowException) as exc:
            raise to_flight_error(Unavailable("the shard's source broke off mid-stream")) from exc
        if chunk.data is not None:
            yield chunk.data


class GatewayFlightServer(flight.FlightServerBase):
    """Listens from construction on `settings.host:settings.gateway_flight_port` (0 = any;
    read `.port`), with TLS / mTLS and the bearer token when settings ask for them. Stop
    with `.shutdown()` from another thread."""

    def __init__(self, settings: Settings, data: DataClient):
        super().__init__(
            flight_location(f"{settings.host}:{settings.gateway_flight_port}", settings),
            **flight_server_options(settings),
        )
        self.settings = settings
        self._data = data

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        """One FlightInfo per dataset (newest version); criteria = a name prefix."""
        with flight_errors():
            prefix = (criteria or b"").decode("utf-8", errors="replace")
            datasets = [d for d in self._data.list_datasets() if d.name.startswith(prefix)]
        for dataset in datasets:
            with flight_errors():
                request = data_pb2.DataRequest(dataset=dataset.name, version=dataset.version)
                # A path names the listed version to any client, as the shard service does.
                descriptor = flight.FlightDescriptor.for_path(dataset.name, str(dataset.version))
                info = _answering(descriptor, self._data.plan(request))
            yield info

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        with flight_errors():
            return _answering(descriptor, self._data.plan(data_request(descriptor)))

    def get_schema(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        with flight_errors():
            return flight.SchemaResult(self._data.plan(data_request(descriptor)).schema)

    def do_get(self, context: Any, ticket: flight.Ticket) -> Any:
        """The proxy path (2 hops): stream the shard from the cache when it holds it, else
        from the shard service, batch by batch (never the whole shard in memory here)."""
        with flight_errors():
            if not ticket.ticket:
                raise InvalidArgument("empty ticket: use one from GetFlightInfo's endpoints")
            shard_ticket(ticket.ticket)
            upstream = self._data.open(self._data.endpoint_for(ticket.ticket))
            schema = upstream.schema
            # A reader, not GeneratorStream: only a reader's stream carries dictionaries.
            return flight.RecordBatchStream(
                pa.RecordBatchReader.from_batches(schema, _relay(upstream))
            )

    def list_actions(self, context: Any) -> list[flight.ActionType]:
        return [flight.ActionType(name, doc) for name, doc in ACTIONS.items()]

    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        """The shard service's actions, passed on unchanged."""
        with flight_errors():
            if action.type not in ACTIONS:
                raise InvalidArgument(
                    f"unknown action {action.type!r}; actions: {', '.join(ACTIONS)}"
                )
            body = action.body.to_pybytes() if action.body is not None else b""
            result = self._data.action(action.type, body)
        return iter([flight.Result(pa.py_buffer(result))])

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
                put_batches(reader, self.settings.max_message_bytes),
                put_schema(reader),
                options=request,
            )
            writer.write(pa.py_buffer(info.SerializeToString()))


async def upload_dataset(
    data: DataClient, chunks: AsyncIterator[bytes], request: data_pb2.IngestRequest
) -> data_pb2.DatasetInfo:
    """`POST /v1/datasets`: the request body (a CSV, Parquet or Arrow file) spooled to a
    temporary file as it arrives, then streamed to the shard service batch by batch (Parquet
    and Arrow files need a seekable source; memory stays bounded at any size)."""
    validate_name("dataset", request.dataset)
    file_format(request.dataset, request.format or "csv")  # an unknown format fails first
    with tempfile.TemporaryDirectory(prefix="onehop-upload-") as directory:
        path = Path(directory) / "upload"
        with open(path, "wb") as spool:
            async for chunk in chunks:
                spool.write(chunk)
        if path.stat().st_size == 0:
            raise InvalidArgument("the request body is empty: send the file's bytes")
        named = data_pb2.IngestRequest()
        named.CopyFrom(request)
        named.format = request.format or "csv"
        return await asyncio.to_thread(data.ingest_file, path, named, "the upload")
