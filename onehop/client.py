"""A small client of the gateway for the CLI and the demo: Flight for data, gRPC
(`onehop.v1.Gateway`) for jobs and lists, the HTTP bridge for predictions."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from onehop.channels import auth_metadata, flight_location, sync_channel, tls_enabled
from onehop.dataplane import flight_client, put_dataset
from onehop.dataset import file_format, open_batches
from onehop.errors import (
    InvalidArgument,
    NotFound,
    OnehopError,
    from_flight_error,
    from_http_status,
    from_rpc_error,
)
from onehop.launcher import pid_alive, read_run_file
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2, gateway_pb2, gateway_pb2_grpc, trainer_pb2


@dataclass(frozen=True)
class Prediction:
    outputs: dict[str, np.ndarray]
    model_version: str
    cache: str
    hops: int
    seconds: float


def gateway_endpoints(settings: Settings) -> dict[str, str]:
    """The running gateway's endpoints: its run file in the data dir, else the settings."""
    info = read_run_file(settings.data_dir, "gateway")
    if info and pid_alive(int(info["pid"])):
        return info["endpoints"]
    host = settings.host
    return {
        "grpc": f"{host}:{settings.gateway_grpc_port}",
        "http": f"{host}:{settings.gateway_http_port}",
        "flight": f"{host}:{settings.gateway_flight_port}",
    }


def read_batches(path: Path) -> pa.RecordBatchReader:
    """A streaming reader over a CSV, Parquet or Arrow IPC file (never loaded whole), its
    format told by the extension; errors name the file and the row or column at fault."""
    if not path.is_file():
        raise NotFound(f"no such file: {path}")
    return open_batches(pa.memory_map(str(path)), file_format(path.name), str(path))


class GatewayClient:
    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.endpoints = gateway_endpoints(settings)
        self.timeout = timeout
        self._channel = sync_channel(self.endpoints["grpc"], settings)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._flight = flight_client(flight_location(self.endpoints["flight"], settings), settings)
        self._http = _http_client(self.endpoints["http"], settings, timeout)

    def close(self) -> None:
        self._channel.close()
        self._flight.close()
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- data ----------------------------------------------------------------------------

    def ingest(
        self, reader: pa.RecordBatchReader, name: str, shards: int = 0, key: str = ""
    ) -> data_pb2.DatasetInfo:
        try:
            return put_dataset(self._flight, name, reader, shards=shards, key=key)
        except pa.ArrowInvalid as exc:  # the local file turned out malformed mid-stream
            raise InvalidArgument(f"cannot read the input: {exc}") from None

    def plan(self, request: data_pb2.DataRequest) -> flight.FlightInfo:
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        try:
            return self._flight.get_flight_info(descriptor)
        except (flight.FlightError, pa.ArrowException) as exc:
            raise from_flight_error(exc) from None

    # --- control -------------------------------------------------------------------------

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def datasets(self) -> list[data_pb2.DatasetInfo]:
        return list(self._call(self._stub.ListDatasets, gateway_pb2.ListDatasetsRequest()).datasets)

    def models(self) -> list[trainer_pb2.ModelInfo]:
        return list(self._call(self._stub.ListModels, trainer_pb2.ListModelsRequest()).models)

    def model(self, name: str) -> trainer_pb2.ModelInfo:
        return self._call(self._stub.GetModel, trainer_pb2.GetModelRequest(name=name))

    def start_job(self, request: trainer_pb2.StartJobRequest) -> str:
        return self._call(self._stub.StartJob, request).job_id

    def watch_job(self, job_id: str) -> Iterator[trainer_pb2.JobStatus]:
        try:
            yield from self._stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # --- inference (HTTP bridge, OIP v2 JSON) ---------------------------------------------

    def predict(self, model: str, rows: np.ndarray) -> Prediction:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "data": rows.ravel().tolist(),
                }
            ]
        }
        response = self._http.post(f"/v2/models/{model}/infer", content=json.dumps(body))
        if response.status_code != 200:
            raise _http_error(response)
        reply = response.json()
        outputs = {
            out["name"]: np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            for out in reply["outputs"]
        }
        return Prediction(
            outputs=outputs,
            model_version=str(reply.get("model_version", "")),
            cache=response.headers.get("onehop-cache", ""),
            hops=int(response.headers.get("onehop-hops", "-1")),
            seconds=response.elapsed.total_seconds(),
        )


def _http_client(address: str, settings: Settings, timeout: float) -> httpx.Client:
    """The HTTP bridge as the settings reach it: HTTPS with the CA (and this process's
    certificate under mTLS) when TLS is on, the bearer token when one is set."""
    headers = dict(auth_metadata(settings))
    if not tls_enabled(settings):
        return httpx.Client(base_url=f"http://{address}", timeout=timeout, headers=headers)
    context = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    if settings.tls_cert_file and settings.tls_key_file:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return httpx.Client(
        base_url=f"https://{address}", timeout=timeout, headers=headers, verify=context
    )


def _http_error(response: httpx.Response) -> OnehopError:
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    return from_http_status(response.status_code, message)
