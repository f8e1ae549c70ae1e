"""The server factory: grpc.aio servers with health, reflection, the error interceptor,
run-file announcement and SIGTERM drain — the same for every onehop process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from onehop.errors import ErrorInterceptor
from onehop.settings import Settings
from onehop.telemetry import setup_logging


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


class GrpcServer:
    """One grpc.aio server: the services added to it plus grpc.health.v1.

    Health is NOT_SERVING until `set_serving(True)`: callers flip it once their store is
    open or their model is loaded, and back to NOT_SERVING when draining.
    """

    def __init__(self, settings: Settings, port: int, interceptors: Sequence[Any] = ()):
        self.settings = settings
        self._requested_port = port
        self.server = grpc.aio.server(
            options=server_options(settings),
            interceptors=[*interceptors, ErrorInterceptor()],
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port = 0

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
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self._requested_port}")
        await self.server.start()
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
    announce(settings, service, running.endpoints)
    try:
        await wait_for_shutdown()
    finally:
        await running.stop()
        withdraw(settings, service)
