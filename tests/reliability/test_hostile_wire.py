"""Garbage on every port and slow clients: raw bytes (random, broken HTTP/2, huge HTTP/1
headers, a TLS hello on a plaintext port) sent to every endpoint of every service; then
slow clients holding connections and streams open at the gateway while others are served.
No service dies, and a normal client is answered within its deadline throughout."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import numpy as np
import pyarrow.flight as flight
import pytest
from harness import DATASET, MODEL, SERVICE_NAMES, Clients, MeshUnderTest, Report, Workloads

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GARBAGE = {
    "random": os.urandom(4096),
    "zeros": b"\0" * (1 << 20),
    "h2 bad frame": H2_PREFACE + b"\xff\xff\xff\x04\x00\x00\x00\x00\x00" + os.urandom(512),
    "h2 huge headers": H2_PREFACE
    + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
    + b"\x00\x40\x00\x01\x04\x00\x00\x00\x01"  # HEADERS, 16 KiB claimed, END_HEADERS
    + os.urandom(16384),
    "http1 huge header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 65536 + b"\r\n\r\n",
    "http1 bad method": b"\x01\x02\x03 /v2 HTTP/1.1\r\n\r\n",
    "tls hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(508),
}


def endpoints(mesh: MeshUnderTest) -> list[tuple[str, str, str]]:
    out = []
    for service in SERVICE_NAMES:
        info = mesh.run_info(service)
        assert info is not None
        out += [(service, kind, address) for kind, address in sorted(info["endpoints"].items())]
    return out


def throw(address: str, payload: bytes) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.settimeout(2)
        try:
            sock.sendall(payload)
            while sock.recv(65536):  # read what it answers until it hangs up (or 2 s pass)
                pass
        except (TimeoutError, ConnectionError):
            pass


def served(mesh: MeshUnderTest, clients: Clients, features: int) -> None:
    """A normal client is answered: gRPC and HTTP predictions, a Flight read."""
    rows = np.zeros((2, features), dtype=np.float32)
    assert clients.infer(MODEL, rows, deadline=10).shape == (2, 1)
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [2, features],
                "data": [0.0] * 2 * features,
            }
        ]
    }
    url = f"http://{mesh.endpoint('gateway', 'http')}/v2/models/{MODEL}/infer"
    assert httpx.post(url, json=body, timeout=10).status_code == 200
    assert clients.read_dataset(DATASET, deadline=20).num_rows > 0


def test_garbage_bytes_on_every_port(
    mesh: MeshUnderTest, clients: Clients, workloads: Workloads, report: Report
) -> None:
    pids = mesh.all_pids()
    for _, _, address in endpoints(mesh):
        for payload in GARBAGE.values():
            throw(address, payload)
            report.bad_input("garbage on a port")
    assert mesh.all_pids() == pids, "a service died of garbage bytes"
    mesh.wait_healthy(timeout=10)
    served(mesh, clients, workloads.pool.shape[1])


@contextmanager
def slow_http_clients(address: str, count: int) -> Iterator[None]:
    """Slowloris: a request line, headers promising a body, one byte of it, then silence."""
    host, port = address.rsplit(":", 1)
    with ExitStack() as stack:
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection((host, int(port)), timeout=5))
            sock.sendall(
                f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{".encode()
            )
        yield


@contextmanager
def silent_h2_clients(address: str, count: int) -> Iterator[None]:
    """Connections that send the HTTP/2 preface and nothing else."""
    host, port = address.rsplit(":", 1)
    with ExitStack() as stack:
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection((host, int(port)), timeout=5))
            sock.sendall(H2_PREFACE)
        yield


@contextmanager
def unread_flight_streams(clients: Clients, count: int) -> Iterator[None]:
    """DoGet streams opened at every location of the plan and never read."""
    info = clients.plan(DATASET, 0, deadline=10)
    readers = []
    with ExitStack() as stack:
        for i in range(count):
            endpoint = info.endpoints[i % len(info.endpoints)]
            for location in [
                *endpoint.locations,
                flight.Location(f"grpc+tcp://{clients.mesh.endpoint('gateway', 'flight')}"),
            ]:
                client = stack.enter_context(flight.connect(location))
                readers.append(client.do_get(endpoint.ticket))
        yield


def test_slow_clients_do_not_starve_others(
    mesh: MeshUnderTest, clients: Clients, workloads: Workloads, report: Report
) -> None:
    pids = mesh.all_pids()
    slow = 32
    with (
        slow_http_clients(mesh.endpoint("gateway", "http"), slow),
        silent_h2_clients(mesh.endpoint("gateway", "grpc"), slow),
        silent_h2_clients(mesh.endpoint("gateway", "flight"), slow // 4),
        unread_flight_streams(clients, 8),
    ):
        report.bad_input("slow clients held open", 2 * slow + slow // 4 + 8)
        served(mesh, clients, workloads.pool.shape[1])
        mesh.wait_healthy(timeout=10)
    assert mesh.all_pids() == pids
    served(mesh, clients, workloads.pool.shape[1])
