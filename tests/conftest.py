"""Shared fixtures: settings rooted in a temporary data directory, every port 0."""

from __future__ import annotations

from pathlib import Path

import pytest

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
