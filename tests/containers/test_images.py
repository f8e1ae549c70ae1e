"""The mesh from the built image, one container per role, started by testcontainers.

Host networking (podman on the project's machines cannot do more; with Docker it is the same
test) and a read-only root filesystem, as on Kubernetes. Free ports are picked here and
handed over as ONEHOP_* settings. The gateway shares the cache's LMDB volume and PID
namespace, as the Kubernetes zero-hop sidecar does, so a repeated prediction is answered from
the memory map (0 hops). Then each container gets SIGTERM and must exit 0 before the engine's
grace period would have killed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from testcontainers.core.container import DockerContainer

from onehop.client import GatewayClient
from onehop.dataset import TARGET, credit_default
from onehop.launcher import health_status
from onehop.settings import Settings
from onehop.training_view import follow_job, job_request

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1200)]

MODEL = "risk"
# Seconds the service drains on SIGTERM, and the engine's grace before it sends SIGKILL.
DRAIN_SECONDS = 2
STOP_GRACE_SECONDS = 10
ROLES = ("cache", "shard", "trainer", "gateway")


@dataclass
class Mesh:
    """The four containers and where they listen (all on 127.0.0.1, host network)."""

    ports: dict[str, int]
    containers: dict[str, DockerContainer] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def health(self, role: str) -> str:
        return health_status(self.address(f"{role}_grpc"))

    def logs(self, role: str) -> str:
        out, err = self.containers[role].get_logs()
        return (out + err).decode(errors="replace")

    def client_settings(self, data_dir: Path) -> Settings:
        return Settings(
            data_dir=data_dir,
            gateway_http_port=self.ports["gateway_http"],
            gateway_grpc_port=self.ports["gateway_grpc"],
            gateway_flight_port=self.ports["gateway_flight"],
        )


def _start(
    mesh: Mesh,
    image: str,
    role: str,
    command: str,
    env: dict[str, str],
    volumes: dict[Path, str],
    **kwargs: Any,
) -> None:
    """Start one container of the image (host network, read-only root) and wait until its
    gRPC health check reports SERVING; extra kwargs go to the engine's create call."""
    container = DockerContainer(image).with_command(command)
    for key, value in {
        "ONEHOP_HOST": "127.0.0.1",
        "ONEHOP_GRACE_SECONDS": str(DRAIN_SECONDS),
        "ONEHOP_CACHE_SIZE_BYTES": str(64 << 20),
        **env,
    }.items():
        container = container.with_env(key, value)
    for host_path, container_path in volumes.items():
        container = container.with_volume_mapping(str(host_path), container_path, "rw")
    # As on Kubernetes (deploy/k8s): read-only root filesystem, writable /data and /tmp only.
    container = container.with_tmpfs_mount("/tmp", "size=256m")
    container = container.with_kwargs(network_mode="host", read_only=True, **kwargs)
    mesh.containers[role] = container.start()
    _wait_serving(mesh, role)


def _wait_serving(mesh: Mesh, role: str, timeout: float = 120) -> None:
    """The port wait strategy cannot see host-network ports: ask grpc.health.v1."""
    wrapped = mesh.containers[role].get_wrapped_container()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mesh.health(role) == "SERVING":
            return
        wrapped.reload()
        if wrapped.status not in ("created", "running"):
            raise AssertionError(f"{role} exited ({wrapped.status}):\n{mesh.logs(role)[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{role} not SERVING within {timeout}s:\n{mesh.logs(role)[-3000:]}")


def _data_dir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    path.chmod(0o777)  # the image runs as uid 10001; the host folder belongs to root
    return path


@pytest.fixture(scope="module")
def mesh(
    image: str,
    tmp_path_factory: pytest.TempPathFactory,
    free_ports: Callable[[int], list[int]],
) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("containers")
    names = [
        "cache_grpc", "cache_flight", "shard_grpc", "shard_flight", "trainer_grpc",
        "gateway_http", "gateway_grpc", "gateway_flight",
    ]  # fmt: skip
    mesh = Mesh(dict(zip(names, free_ports(len(names)), strict=True)))
    cache_dir = _data_dir(tmp, "cache")
    inner = {
        "ONEHOP_CACHE_ADDRESS": mesh.address("cache_grpc"),
        "ONEHOP_CACHE_FLIGHT_ADDRESS": mesh.address("cache_flight"),
        "ONEHOP_SHARD_ADDRESS": mesh.address("shard_flight"),
        "ONEHOP_SHARD_HEALTH_ADDRESS": mesh.address("shard_grpc"),
    }
    try:
        _start(
            mesh, image, "cache", "cache_service",
            {"ONEHOP_CACHE_GRPC_PORT": str(mesh.ports["cache_grpc"]),
             "ONEHOP_CACHE_FLIGHT_PORT": str(mesh.ports["cache_flight"])},
            volumes={cache_dir: "/data"},
        )  # fmt: skip
        _start(
            mesh, image, "shard", "shard_service",
            {**inner, "ONEHOP_SHARD_GRPC_PORT": str(mesh.ports["shard_grpc"]),
             "ONEHOP_SHARD_FLIGHT_PORT": str(mesh.ports["shard_flight"])},
            volumes={_data_dir(tmp, "shard"): "/data"},
        )  # fmt: skip
        _start(
            mesh, image, "trainer", "trainer_service",
            {**inner, "ONEHOP_TRAINER_GRPC_PORT": str(mesh.ports["trainer_grpc"])},
            volumes={_data_dir(tmp, "trainer"): "/data"},
        )  # fmt: skip
        cache_id = mesh.containers["cache"].get_wrapped_container().id
        _start(
            mesh, image, "gateway", "gateway",
            {**inner, "ONEHOP_TRAINER_ADDRESS": mesh.address("trainer_grpc"),
             "ONEHOP_GATEWAY_HTTP_PORT": str(mesh.ports["gateway_http"]),
             "ONEHOP_GATEWAY_GRPC_PORT": str(mesh.ports["gateway_grpc"]),
             "ONEHOP_GATEWAY_FLIGHT_PORT": str(mesh.ports["gateway_flight"]),
             # The cache's volume, read-only to the gateway's LMDB reader: zero-hop hits.
             "ONEHOP_CACHE_PATH": "/cache/cache"},
            volumes={_data_dir(tmp, "gateway"): "/data", cache_dir: "/cache"},
            # LMDB's reader table records PIDs: share one PID namespace, as a pod would.
            pid_mode=f"container:{cache_id}",
        )  # fmt: skip
        yield mesh
    finally:
        for role in reversed(ROLES):
            if role in mesh.containers:
                mesh.containers[role].stop()  # removes it (force) if a test left it running


def test_ingest_train_and_predict_with_a_hit_through_the_gateway(
    mesh: Mesh, tmp_path: Path
) -> None:
    table = credit_default(2_000, seed=5)
    features = [c for c in table.column_names if c != TARGET]
    rows = np.column_stack([table[f].to_numpy()[:8].astype(np.float32) for f in features])
    with GatewayClient(mesh.client_settings(tmp_path / "client")) as client:
        info = client.ingest(
            pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), "credit", 2
        )
        assert (info.rows, len(info.shards)) == (2_000, 2)
        request = job_request(
            dataset="credit", target=TARGET, model=MODEL, epochs=1, batch_size=64,
            hidden="16", dropout=0.0, lr=1e-2, val_split=0.2, seed=3,
        )  # fmt: skip
        outcome = follow_job(client, client.start_job(request))
        assert outcome.state_name == "SUCCEEDED", mesh.logs("trainer")[-3000:]

        first = client.predict(MODEL, rows)
        assert first.cache == "miss"
        # The write-back lands after the response (off the critical path): ask again, bounded.
        for _ in range(100):
            second = client.predict(MODEL, rows)
            if second.cache == "hit":
                break
            time.sleep(0.05)
    assert second.cache == "hit", second
    assert second.hops == 0  # read from the cache's LMDB through the shared volume
    np.testing.assert_array_equal(first.outputs["probability"], second.outputs["probability"])
    assert ((first.outputs["probability"] > 0) & (first.outputs["probability"] < 1)).all()


def test_each_container_runs_as_non_root_and_exits_0_on_sigterm_within_its_grace(
    mesh: Mesh,
) -> None:
    for role in reversed(ROLES):  # the order Kubernetes or `onehop up` would stop them in
        wrapped = mesh.containers[role].get_wrapped_container()
        assert wrapped.attrs["Config"]["User"] == "10001:10001"
        assert mesh.health(role) == "SERVING"
        # docker/podman stop: SIGTERM, then SIGKILL (exit 137) once the grace has passed.
        started = time.monotonic()
        wrapped.stop(timeout=STOP_GRACE_SECONDS)
        took = time.monotonic() - started
        wrapped.reload()
        state = wrapped.attrs["State"]
        assert state["ExitCode"] == 0, f"{role} exit {state['ExitCode']} after {took:.1f}s"
        assert took < STOP_GRACE_SECONDS  # exit 0 already says no SIGKILL was needed
        assert not state.get("OOMKilled")
        assert "Traceback" not in mesh.logs(role), mesh.logs(role)[-3000:]
        print(f"{role}: SIGTERM → exit 0 in {took:.2f}s (grace {STOP_GRACE_SECONDS}s)")


def test_onehop_up_runs_the_whole_mesh_in_one_container(
    image: str, tmp_path: Path, free_ports: Callable[[int], list[int]]
) -> None:
    http, grpc_port, flight = free_ports(3)
    mesh = Mesh({"gateway_grpc": grpc_port})
    _start(
        mesh, image, "gateway", "onehop up",
        {"ONEHOP_GATEWAY_HTTP_PORT": str(http), "ONEHOP_GATEWAY_GRPC_PORT": str(grpc_port),
         "ONEHOP_GATEWAY_FLIGHT_PORT": str(flight)},
        volumes={_data_dir(tmp_path, "data"): "/data"},
    )  # fmt: skip
    container = mesh.containers["gateway"]
    try:
        wrapped = container.get_wrapped_container()
        wrapped.stop(timeout=STOP_GRACE_SECONDS * 3)  # the launcher stops four services in turn
        wrapped.reload()
        assert wrapped.attrs["State"]["ExitCode"] == 0, mesh.logs("gateway")[-3000:]
        assert "stopped" in mesh.logs("gateway")
    finally:
        container.stop()
