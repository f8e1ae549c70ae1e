"""The server factory: grpc.aio servers with health, reflection, the error interceptor,
bearer-token auth, TLS / mTLS, run-file announcement and SIGTERM drain — the same for every
onehop process. The HTTP and Flight fronts take their TLS and auth settings from here too."""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import os
import signal
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pyarrow.flight as flight
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from onehop.errors import ErrorInterceptor, Unauthenticated
from onehop.settings import Settings
from onehop.telemetry import setup_logging

# Calls that need no token: probes must work without credentials.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        # Arrow batches and OIP tensors travel in one message.
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Never share a port with a stale or second server: a clash must fail loudly.
        ("grpc.so_reuseport", 0),
        # Let idle client connections keep alive through NATs and proxies.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def token_matches(settings: Settings, authorization: str | None) -> bool:
    """Whether an `authorization` header or metadata value carries the configured bearer
    token (always true when none is configured); constant-time."""
    if not settings.auth_token:
        return True
    expected = f"Bearer {settings.auth_token}".encode()
    return hmac.compare_digest((authorization or "").encode(), expected)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call but the health probes."""

    def __init__(self, settings: Settings):
        self.settings = settings

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method in OPEN_METHODS:
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if token_matches(self.settings, metadata.get("authorization")):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    error = Unauthenticated("missing or invalid bearer token (authorization: Bearer <token>)")

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(error.code, error.message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for a gRPC server when settings name a certificate and key; with
    `tls_client_auth`, clients must present a certificate signed by `tls_ca_file`."""
    if not (settings.tls_cert_file and settings.tls_key_file):
        return None
    if settings.tls_client_auth and not settings.tls_ca_file:
        raise ValueError("tls_client_auth needs tls_ca_file to verify client certificates")
    pair = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=(
            Path(settings.tls_ca_file).read_bytes() if settings.tls_client_auth else None
        ),
        require_client_auth=settings.tls_client_auth,
    )


def uvicorn_tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for HTTPS (and client certificates under mTLS)."""
    if not (settings.tls_cert_file and settings.tls_key_file):
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
    }
    if settings.tls_client_auth:
        options["ssl_ca_certs"] = settings.tls_ca_file
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def flight_server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `pyarrow.flight.FlightServerBase.__init__`: TLS certificates,
    client verification under mTLS, and the bearer-token middleware. The location must then
    use `onehop.channels.flight_location(address, settings)` (grpc+tls)."""
    options: dict[str, Any] = {}
    if settings.tls_cert_file and settings.tls_key_file:
        options["tls_certificates"] = [
            flight.CertKeyPair(
                cert=Path(settings.tls_cert_file).read_bytes(),
                key=Path(settings.tls_key_file).read_bytes(),
            )
        ]
        if settings.tls_client_auth:
            options["verify_client"] = True
            options["root_certificates"] = Path(settings.tls_ca_file).read_bytes()
    if settings.auth_token:
        options["middleware"] = {"auth": _FlightTokenFactory(settings)}
    return options


class _FlightTokenFactory(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Flight middleware: every call needs the bearer token in its `authorization` header."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def start_call(self, info: Any, headers: dict[str, list[str]]) -> None:
        values = headers.get("authorization") or headers.get("Authorization") or [""]
        if not token_matches(self.settings, values[0]):
            raise flight.FlightUnauthenticatedError("missing or invalid bearer token")
        return None


class GrpcServer:
    """One grpc.aio server: the services added to it plus grpc.health.v1.

    Health is NOT_SERVING until `set_serving(True)`: callers flip it once their store is
    open or their model is loaded, and back to NOT_SERVING when draining.
    """

    def __init__(self, settings: Settings, port: int, interceptors: Sequence[Any] = ()):
        self.settings = settings
        self._requested_port = port
        auth = [AuthInterceptor(settings)] if settings.auth_token else []
        self.server = grpc.aio.server(
            options=server_options(settings),
            # Auth first: a refused call never reaches a handler.
            interceptors=[*auth, *interceptors, ErrorInterceptor()],
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port = 0
        # Kubernetes' native gRPC probes speak plaintext only: with `health_port` set, the
        # same health servicer also answers there, without TLS or token.
        self._probe_server: grpc.aio.Server | None = None

    def add(self, register: Callable[[Any, Any], None], servicer: Any, full_name: str) -> None:
        register(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        if self.settings.reflection:
            names = [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ]
            reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        address = f"{self.settings.host}:{self._requested_port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        await self.server.start()
        if self.settings.health_port:
            self._probe_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._probe_server)
            self._probe_server.add_insecure_port(
                f"{self.settings.host}:{self.settings.health_port}"
            )
            await self._probe_server.start()
        await self.set_serving(False)
        return self.port

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        await self.set_serving(False)
        await self.server.stop(self.settings.grace_seconds)
        if self._probe_server is not None:
            await self._probe_server.stop(0)


async def wait_for_shutdown() -> None:
    """Return on the first SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_file(data_dir: Path, service: str) -> Path:
    return data_dir / "run" / f"{service}.json"


def announce(settings: Settings, service: str, endpoints: dict[str, str]) -> Path:
    """Write the service's run file (pid, endpoints) atomically; the launcher and
    `onehop status` read it. `endpoints["grpc"]` is where its health service answers."""
    path = run_file(settings.data_dir, service)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"name": service, "pid": os.getpid(), "endpoints": endpoints}))
    tmp.replace(path)
    return path


def withdraw(settings: Settings, service: str) -> None:
    path = run_file(settings.data_dir, service)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


class Running:
    """A started service: where it listens and how to stop it (drain, close, exit)."""

    def __init__(self, endpoints: dict[str, str], stop: Callable[[], Any]):
        self.endpoints = endpoints
        self._stop = stop

    async def stop(self) -> None:
        await self._stop()


def run_service(service: str, start: Callable[[Settings], Any]) -> None:
    """`python -m <service>`: settings from the environment, JSON logs, serve until a signal."""
    settings = Settings()
    setup_logging(service, settings.log_level)
    asyncio.run(serve_forever(service, settings, start))


async def serve_forever(service: str, settings: Settings, start: Callable[[Settings], Any]) -> None:
    """`python -m <service>`: start, announce, wait for SIGINT/SIGTERM, drain, withdraw."""
    running: Running = await start(settings)
    # What start built lives as long as the process (modules, models, servers): out of the
    # collector's sight, a full collection no longer walks it (~200 ms on a 2-core machine,
    # a stall of every request in flight).
    gc.collect()
    gc.freeze()
    announce(settings, service, running.endpoints)
    try:
        await wait_for_shutdown()
    finally:
        await running.stop()
        withdraw(settings, service)
