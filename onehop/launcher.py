"""The local launcher behind `onehop up`: one process per service on loopback, started in
dependency order, each waited on through its health check, restarted if it dies, and stopped
in reverse order on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onehop.channels import sync_channel
from onehop.server import run_file
from onehop.settings import Settings


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    # endpoint name → the settings field that pins its port on a restart
    ports: dict[str, str]


SERVICES = (
    ServiceSpec(
        "cache", "cache_service", {"grpc": "cache_grpc_port", "flight": "cache_flight_port"}
    ),
    ServiceSpec(
        "shard", "shard_service", {"grpc": "shard_grpc_port", "flight": "shard_flight_port"}
    ),
    ServiceSpec("trainer", "trainer_service", {"grpc": "trainer_grpc_port"}),
    ServiceSpec(
        "gateway",
        "gateway",
        {"grpc": "gateway_grpc_port", "http": "gateway_http_port", "flight": "gateway_flight_port"},
    ),
)


class LaunchError(RuntimeError):
    """A service could not be started; the message says which and shows its log's tail."""


def read_run_file(data_dir: Path, service: str) -> dict | None:
    try:
        return json.loads(run_file(data_dir, service).read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health_status(address: str, timeout: float = 1.0, settings: Settings | None = None) -> str:
    """SERVING, NOT_SERVING, UNKNOWN or UNREACHABLE. `settings` with TLS files make the
    probe speak TLS (mTLS with a certificate); probes need no token."""
    channel = sync_channel(address, settings) if settings else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass
class _Child:
    spec: ServiceSpec
    process: subprocess.Popen
    endpoints: dict[str, str] = field(default_factory=dict)


class Mesh:
    """The services of one data directory, as child processes of this one."""

    def __init__(
        self,
        settings: Settings,
        start_timeout: float = 90.0,
        say: Callable[[str], None] = print,
        services: tuple[ServiceSpec, ...] = SERVICES,
        env: dict[str, str] | None = None,
    ):
        """`services`: a subset of SERVICES (without "cache", the mesh runs uncached);
        `env`: extra ONEHOP_* variables for every child (e.g. a benchmark's knobs)."""
        self.settings = settings
        self.services = services
        self.extra_env = env or {}
        self.data_dir = settings.data_dir
        self.start_timeout = start_timeout
        self.say = say
        self.children: dict[str, _Child] = {}
        self._pinned: dict[str, str] = {}

    # --- start -------------------------------------------------------------------------

    def start(self) -> dict[str, dict[str, str]]:
        running = self.running_gateway()
        if running:
            raise LaunchError(
                f"a mesh is already running in {self.data_dir} (gateway pid {running['pid']}); "
                "stop it first or pass another --data-dir"
            )
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            for spec in self.services:
                self._start_service(spec)
        except BaseException:
            self.stop()
            raise
        return {name: child.endpoints for name, child in self.children.items()}

    def running_gateway(self) -> dict | None:
        info = read_run_file(self.data_dir, "gateway")
        if info and pid_alive(int(info["pid"])):
            return info
        return None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["ONEHOP_DATA_DIR"] = str(self.data_dir)
        env["ONEHOP_HOST"] = self.settings.host
        # Every child sees the same explicit settings as this process.
        for name, value in (
            ("GATEWAY_HTTP_PORT", self.settings.gateway_http_port),
            ("GATEWAY_GRPC_PORT", self.settings.gateway_grpc_port),
            ("GATEWAY_FLIGHT_PORT", self.settings.gateway_flight_port),
        ):
            env[f"ONEHOP_{name}"] = str(value)
        cache = self.children.get("cache")
        if cache:
            env["ONEHOP_CACHE_ADDRESS"] = cache.endpoints["grpc"]
            env["ONEHOP_CACHE_FLIGHT_ADDRESS"] = cache.endpoints["flight"]
            # The gateway shares this host with the cache: zero-hop reads from its LMDB.
            env["ONEHOP_CACHE_PATH"] = str(self.data_dir / "cache")
        shard = self.children.get("shard")
        if shard:
            env["ONEHOP_SHARD_ADDRESS"] = shard.endpoints["flight"]
            env["ONEHOP_SHARD_HEALTH_ADDRESS"] = shard.endpoints["grpc"]
        trainer = self.children.get("trainer")
        if trainer:
            env["ONEHOP_TRAINER_ADDRESS"] = trainer.endpoints["grpc"]
        env.update(self.extra_env)
        env.update(self._pinned)
        return env

    def _start_service(self, spec: ServiceSpec) -> None:
        run_file(self.data_dir, spec.name).unlink(missing_ok=True)
        log_path = self.data_dir / "logs" / f"{spec.name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", spec.module],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C reaches the launcher only, which stops children in order.
                start_new_session=True,
            )
        child = _Child(spec, process)
        self.children[spec.name] = child
        child.endpoints = self._wait_ready(child, log_path)
        for endpoint, field_name in spec.ports.items():
            port = child.endpoints[endpoint].rsplit(":", 1)[1]
            self._pinned[f"ONEHOP_{field_name.upper()}"] = port
        shown = " ".join(f"{k}={v}" for k, v in sorted(child.endpoints.items()))
        self.say(f"{spec.name:<8} ready  pid={process.pid} {shown}")

    def _wait_ready(self, child: _Child, log_path: Path) -> dict[str, str]:
        deadline = time.monotonic() + self.start_timeout
        # Probe as the children listen: with the TLS files their environment names.
        env = {**os.environ, **self.extra_env}
        probe = self.settings.model_copy(
            update={
                name: env.get(f"ONEHOP_{name.upper()}", getattr(self.settings, name))
                for name in ("tls_cert_file", "tls_key_file", "tls_ca_file")
            }
        )
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise LaunchError(
                    f"{child.spec.name} exited with code {child.process.returncode} while starting; "
                    f"last lines of {log_path}:\n{_tail(log_path)}"
                )
            info = read_run_file(self.data_dir, child.spec.name)
            if info and info.get("pid") == child.process.pid:
                if health_status(info["endpoints"]["grpc"], settings=probe) == "SERVING":
                    return info["endpoints"]
            time.sleep(0.1)
        raise LaunchError(
            f"{child.spec.name} did not report SERVING within {self.start_timeout:.0f}s; "
            f"last lines of {log_path}:\n{_tail(log_path)}"
        )

    # --- supervise and stop ---------------------------------------------------------------

    def supervise(self, stop_requested: Callable[[], bool], poll: float = 0.5) -> None:
        """Restart any service that dies (on its old ports) until a stop is requested."""
        while not stop_requested():
            for spec in SERVICES:
                child = self.children.get(spec.name)
                if child and child.process.poll() is not None and not stop_requested():
                    self.say(
                        f"{spec.name:<8} exited with code {child.process.returncode}; restarting"
                    )
                    self._start_service(spec)
            time.sleep(poll)

    def restart(self, name: str, env: dict[str, str] | None = None) -> None:
        """Stop one service and start it again on its ports, with `env` added to its
        environment for this start (e.g. a benchmark's knob); the others keep running."""
        child = self.children[name]
        self._stop_child(child)
        saved = self.extra_env
        self.extra_env = {**saved, **(env or {})}
        try:
            self._start_service(child.spec)
        finally:
            self.extra_env = saved

    def stop(self) -> None:
        """SIGTERM in reverse dependency order; SIGKILL whatever outlives its grace."""
        for spec in reversed(SERVICES):
            child = self.children.get(spec.name)
            if child is not None:
                self._stop_child(child)

    def _stop_child(self, child: _Child) -> None:
        """SIGTERM, then SIGKILL past its grace; its run file goes with it."""
        if child.process.poll() is not None:
            return
        child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(self.settings.grace_seconds + 5.0)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        run_file(self.data_dir, child.spec.name).unlink(missing_ok=True)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def status(data_dir: Path, settings: Settings | None = None) -> list[dict]:
    """What `onehop status` shows: each service's pid, endpoints and health (probed with
    the TLS files of `settings` when they name any)."""
    rows: list[dict] = []
    for spec in SERVICES:
        info = read_run_file(data_dir, spec.name)
        if info is None:
            rows.append({"name": spec.name, "pid": None, "endpoints": {}, "health": "STOPPED"})
            continue
        alive = pid_alive(int(info["pid"]))
        health = health_status(info["endpoints"]["grpc"], settings=settings) if alive else "STOPPED"
        rows.append({**info, "health": health})
    return rows
