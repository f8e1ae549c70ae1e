"""Shared fixtures: settings rooted in a temporary data directory, every port 0."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from onehop.server import Running
from onehop.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        gateway_http_port=0,
        gateway_grpc_port=0,
        gateway_flight_port=0,
        grace_seconds=0.5,
        cache_size_bytes=64 << 20,
    )


async def start_inner_services(settings: Settings, started: list[Running]) -> Settings:
    """Cache, shard and trainer in-process on port 0, wired as `onehop up` wires them.

    Each started service is appended to `started` (stop them in reverse order, also when
    this raises); the returned settings point at all three.
    """
    import cache_service.server
    import shard_service.server
    import trainer_service.server

    cache = await cache_service.server.start(settings)
    started.append(cache)
    settings = settings.model_copy(
        update={
            "cache_address": cache.endpoints["grpc"],
            "cache_flight_address": cache.endpoints["flight"],
        }
    )
    shard = await shard_service.server.start(settings)
    started.append(shard)
    settings = settings.model_copy(
        update={
            "shard_address": shard.endpoints["flight"],
            "shard_health_address": shard.endpoints["grpc"],
        }
    )
    trainer = await trainer_service.server.start(settings)
    started.append(trainer)
    return settings.model_copy(update={"trainer_address": trainer.endpoints["grpc"]})


@pytest.fixture(scope="session")
def inner_services() -> Callable[[Settings, list[Running]], Awaitable[Settings]]:
    """`start_inner_services`, for module-scoped fixtures that build a mesh in-process."""
    return start_inner_services


def bind_and_release(count: int) -> list[int]:
    """Ports bound on 127.0.0.1 and released at once: free now, and nothing listens there."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def free_ports() -> Callable[[int], list[int]]:
    """`free_ports(n)`: n ports to pin a server to, or to point a client at nothing."""
    return bind_and_release
