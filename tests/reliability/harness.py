"""The reliability harness: the mesh started exactly as `onehop up` starts it (the launcher's
`Mesh`, supervised on a thread, in a temporary data dir, every port free), load on threads
with a deadline on every call, fault injectors (SIGKILL, SIGSTOP/SIGCONT), an RSS sampler, a
ledger of acknowledged writes, and the report the suite's figures come from.

Everything talks to the services from the outside: gRPC, HTTP and Flight clients on the
endpoints each service announces in its run file (data_dir/run/<service>.json).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight

from onehop.dataset import TARGET, credit_default
from onehop.errors import OnehopError, from_flight_error
from onehop.launcher import SERVICES, Mesh, health_status, pid_alive, read_run_file
from onehop.settings import Settings
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from protos.onehop.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    data_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    trainer_pb2,
)

SERVICE_NAMES = tuple(spec.name for spec in SERVICES)
# `make reliability` runs the full suite; CI runs the bounded subset.
FULL = os.environ.get("ONEHOP_RELIABILITY", "") == "full"
DATASET = "credit"
DATASET_ROWS = 2_000
MODEL = "risk"
# Codes an in-flight call may end with while a dependency is killed or paused.
FAULT_CODES = frozenset({"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
MiB = 1 << 20


def overran(seconds: float, deadline: float) -> bool:
    """A call that returned this long after its deadline hung: generous for a loaded CI box."""
    return seconds > deadline * 1.5 + 3.0


def code_of(exc: BaseException) -> str:
    """The status name a client saw: gRPC's code, or the one a Flight error carries."""
    if isinstance(exc, grpc.RpcError):
        return exc.code().name  # type: ignore[attr-defined]
    if isinstance(exc, flight.FlightError | pa.ArrowException):
        return from_flight_error(exc).code.name
    if isinstance(exc, OnehopError):
        return exc.code.name
    if isinstance(exc, OSError):  # pyarrow re-raises a Flight status as OSError at times
        head = str(exc).split(":", 1)[0]
        return head if head in grpc.StatusCode.__members__ else "INTERNAL"
    raise exc


class Wrong(AssertionError):
    """A call that succeeded with a wrong answer (counted as its own outcome: WRONG)."""


# --- the mesh --------------------------------------------------------------------------------


class MeshUnderTest:
    """The launcher's Mesh (same Popen, same env, same restart-on-exit supervision), run on a
    thread; the env overrides are what `ONEHOP_*` variables around `onehop up` would set."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, start_timeout: float = 90.0
    ):
        self.data_dir = data_dir
        self.start_timeout = start_timeout
        self.env = dict(env or {})
        self.lines: list[str] = []
        self.supervisor_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved_env: dict[str, str | None] = {}
        self.launcher: Mesh | None = None
        self._endpoints: dict[str, dict[str, str]] = {}

    def start(self) -> MeshUnderTest:
        extra: dict[str, Any] = {}
        if "env" in inspect.signature(Mesh).parameters:
            extra["env"] = self.env  # the launcher adds them to every child's environment
        else:  # it hands its own environment to every child, restarts included
            for key, value in self.env.items():
                self._saved_env[key] = os.environ.get(key)
                os.environ[key] = value
        settings = Settings(
            data_dir=self.data_dir,
            gateway_http_port=0,
            gateway_grpc_port=0,
            gateway_flight_port=0,
            grace_seconds=1.0,
        )
        self.launcher = Mesh(
            settings, start_timeout=self.start_timeout, say=self.lines.append, **extra
        )
        self._endpoints = {n: dict(e) for n, e in self.launcher.start().items()}
        self._thread = threading.Thread(target=self._supervise, name="supervise", daemon=True)
        self._thread.start()
        return self

    def _supervise(self) -> None:
        assert self.launcher is not None
        try:
            self.launcher.supervise(self._stop.is_set, poll=0.2)
        except BaseException as exc:  # a restart that failed: the scenario reports it
            self.supervisor_error = exc

    def stop(self) -> None:
        self._stop.set()
        for name in SERVICE_NAMES:  # a paused child would never see SIGTERM
            info = self.run_info(name)
            if info and pid_alive(int(info["pid"])):
                _signal(int(info["pid"]), signal.SIGCONT)
        if self._thread is not None:
            self._thread.join(120)
        if self.launcher is not None:
            self.launcher.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # --- where things are -------------------------------------------------------------------

    def run_info(self, service: str) -> dict | None:
        return read_run_file(self.data_dir, service)

    def pid(self, service: str) -> int:
        info = self.run_info(service)
        if info is None:
            raise AssertionError(f"{service} has no run file")
        return int(info["pid"])

    def endpoint(self, service: str, kind: str = "grpc") -> str:
        # Restarts reuse the old ports, so the endpoints of the first start stay true.
        return self._endpoints[service][kind]

    def all_pids(self) -> dict[str, int]:
        return {name: self.pid(name) for name in SERVICE_NAMES}

    # --- waiting ----------------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        rows = {}
        for name in SERVICE_NAMES:
            info = self.run_info(name)
            alive = info is not None and pid_alive(int(info["pid"]))
            rows[name] = health_status(info["endpoints"]["grpc"]) if alive else "STOPPED"
        return rows

    def wait_healthy(self, timeout: float = 90.0) -> dict[str, str]:
        """Every service SERVING (restarts finished); raises with the launcher's lines if not."""
        deadline = time.monotonic() + timeout
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.supervisor_error is not None:
                raise AssertionError(f"the launcher failed a restart: {self.supervisor_error}")
            health = self.health()
            if all(state == "SERVING" for state in health.values()):
                return health
            time.sleep(0.2)
        raise AssertionError(f"mesh not healthy after {timeout}s: {health}\n" + self.log_tail())

    def wait_restarted(self, service: str, old_pid: int, timeout: float = 90.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.supervisor_error is not None:
                raise AssertionError(f"the launcher failed a restart: {self.supervisor_error}")
            info = self.run_info(service)
            if info and int(info["pid"]) != old_pid and pid_alive(int(info["pid"])):
                if health_status(info["endpoints"]["grpc"]) == "SERVING":
                    return int(info["pid"])
            time.sleep(0.2)
        raise AssertionError(f"{service} was not restarted within {timeout}s\n" + self.log_tail())

    def log_tail(self, lines: int = 15) -> str:
        parts = ["launcher: " + " | ".join(self.lines[-10:])]
        for name in SERVICE_NAMES:
            path = self.data_dir / "logs" / f"{name}.log"
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = []
            parts.append(f"--- {name}.log\n" + "\n".join(tail))
        return "\n".join(parts)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    """The suite's figures, filled by the fixtures and the tests, written at session end."""

    scenarios: list[dict] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    bad_inputs: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    acknowledged_writes: int = 0
    lost_writes: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    rss: dict[str, dict[str, float]] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def bad_input(self, kind: str, count: int = 1) -> None:
        with self._lock:
            self.bad_inputs[kind] += count

    def finding(self, scenario: str, what: str, where: str) -> None:
        """One entry per distinct finding, listing every scenario that met it."""
        with self._lock:
            for entry in self.findings:
                if entry["what"] == what:
                    if scenario not in entry["scenarios"]:
                        entry["scenarios"].append(scenario)
                    return
            self.findings.append({"what": what, "where": where, "scenarios": [scenario]})

    def record_rss(self, growth: dict[str, dict[str, float]]) -> None:
        with self._lock:
            for service, figures in growth.items():
                seen = self.rss.setdefault(service, {"max_growth_mib": 0.0, "peak_mib": 0.0})
                seen["max_growth_mib"] = max(seen["max_growth_mib"], figures["growth_mib"])
                seen["peak_mib"] = max(seen["peak_mib"], figures["peak_mib"])

    def summary(self) -> dict[str, Any]:
        failed = [s for s in self.scenarios if s["outcome"] == "failed"]
        growth = max((v["max_growth_mib"] for v in self.rss.values()), default=0.0)
        return {
            "mode": "full" if FULL else "ci",
            "scenarios_run": len(self.scenarios),
            "scenarios_passed": sum(s["outcome"] == "passed" for s in self.scenarios),
            "known_failures": sum(s["outcome"] == "xfailed" for s in self.scenarios),
            "failures": len(failed),
            "faults_injected": sum(self.faults.values()),
            "bad_inputs_tried": sum(self.bad_inputs.values()),
            "client_calls": sum(self.calls.values()),
            "acknowledged_writes": self.acknowledged_writes,
            "acknowledged_writes_lost": len(self.lost_writes),
            "corrupt_items": len(self.corrupt),
            "max_rss_growth_mib": round(growth, 1),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "faults": dict(self.faults),
            "bad_inputs": dict(self.bad_inputs),
            "calls": dict(self.calls),
            "rss": self.rss,
            "lost_writes": self.lost_writes,
            "corrupt": self.corrupt,
            "findings": self.findings,
            "scenarios": self.scenarios,
        }

    def table(self) -> str:
        s = self.summary()
        rows = [
            ("scenarios run", f"{s['scenarios_run']} ({s['scenarios_passed']} passed)"),
            ("faults injected", _counted(s["faults_injected"], self.faults)),
            ("bad inputs tried", _counted(s["bad_inputs_tried"], self.bad_inputs)),
            ("failures", f"{s['failures']} (+{s['known_failures']} known, xfail)"),
            ("acknowledged writes", str(s["acknowledged_writes"])),
            ("acknowledged writes lost", str(s["acknowledged_writes_lost"])),
            ("corrupt items after recovery", str(s["corrupt_items"])),
            ("max RSS growth", f"{s['max_rss_growth_mib']} MiB" + _per_service(self.rss)),
            ("client calls under faults", _counted(s["client_calls"], self.calls)),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        for f in self.findings:
            shown = ", ".join(f["scenarios"][:3]) + (" …" if len(f["scenarios"]) > 3 else "")
            lines.append(f"finding ({f['where']}; {shown}): {f['what']}")
        return "\n".join(lines)


def _counted(total: int, by_kind: Counter) -> str:
    if not by_kind:
        return str(total)
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())) + ")"


def _per_service(rss: dict[str, dict[str, float]]) -> str:
    if not rss:
        return ""
    return " (" + ", ".join(f"{k} {v['max_growth_mib']:.1f}" for k, v in sorted(rss.items())) + ")"


REPORT = Report()


# --- faults ----------------------------------------------------------------------------------


class Faults:
    """SIGKILL and SIGSTOP/SIGCONT by the pid in a service's run file; each one is counted."""

    def __init__(self, mesh: MeshUnderTest, report: Report = REPORT):
        self.mesh = mesh
        self.report = report
        self._paused: set[int] = set()

    def kill(self, service: str) -> int:
        """SIGKILL the service; the launcher's supervisor restarts it. Returns the old pid."""
        pid = self.mesh.pid(service)
        os.kill(pid, signal.SIGKILL)
        self.report.fault(f"kill -9 {service}")
        return pid

    def kill_and_wait(self, service: str) -> int:
        old = self.kill(service)
        return self.mesh.wait_restarted(service, old)

    @contextmanager
    def paused(self, service: str) -> Iterator[int]:
        pid = self.mesh.pid(service)
        os.kill(pid, signal.SIGSTOP)
        self._paused.add(pid)
        self.report.fault(f"pause {service}")
        try:
            yield pid
        finally:
            _signal(pid, signal.SIGCONT)
            self._paused.discard(pid)

    def release(self) -> None:
        for pid in list(self._paused):
            _signal(pid, signal.SIGCONT)
        self._paused.clear()


class RssSampler:
    """RSS of every service process every `interval` seconds, by the pids in the run files."""

    def __init__(self, mesh: MeshUnderTest, interval: float = 0.5):
        self.mesh = mesh
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int, int]]] = {n: [] for n in SERVICE_NAMES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval):
            for name in SERVICE_NAMES:
                info = self.mesh.run_info(name)
                if info is None:
                    continue
                try:
                    rss = psutil.Process(int(info["pid"])).memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.samples[name].append((time.monotonic() - start, int(info["pid"]), rss))

    def growth(self) -> dict[str, dict[str, float]]:
        """Per service: RSS growth over the longest-lived process (median of its last samples
        minus median of its first, skipping warm-up), and the peak."""
        out: dict[str, dict[str, float]] = {}
        for name, samples in self.samples.items():
            if not samples:
                continue
            by_pid: dict[int, list[int]] = {}
            for _, pid, rss in samples:
                by_pid.setdefault(pid, []).append(rss)
            longest = max(by_pid.values(), key=len)
            growth = 0.0
            if len(longest) >= 8:
                body = longest[len(longest) // 5 :]  # the first fifth is warm-up
                k = max(3, len(body) // 5)
                growth = (statistics.median(body[-k:]) - statistics.median(body[:k])) / MiB
            out[name] = {
                "growth_mib": round(max(growth, 0.0), 2),
                "peak_mib": round(max(rss for _, _, rss in samples) / MiB, 1),
                "samples": float(len(samples)),
            }
        return out


# --- the ledger of acknowledged writes -------------------------------------------------------


class Ledger:
    """Every write a service acknowledged; `verify` reads each one back after recovery."""

    def __init__(self, report: Report = REPORT):
        self.report = report
        self.cache: dict[bytes, str] = {}
        # (name, version) → (rows, checksum column, its sum)
        self.datasets: dict[tuple[str, int], tuple[int, str, int]] = {}
        self.models: dict[tuple[str, int], str] = {}
        self.conflicts: list[str] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.cache) + len(self.datasets) + len(self.models)

    def cache_put(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self.cache[key] = hashlib.sha256(value).hexdigest()
            self.report.acknowledged_writes += 1

    def dataset(self, name: str, version: int, rows: int, column: str, checksum: int) -> None:
        with self._lock:
            if (name, version) in self.datasets:
                self.conflicts.append(f"dataset {name} version {version} acknowledged twice")
            self.datasets[(name, version)] = (rows, column, checksum)
            self.report.acknowledged_writes += 1

    def model(self, name: str, version: int, digest: str) -> None:
        with self._lock:
            if (name, version) in self.models and self.models[(name, version)] != digest:
                self.conflicts.append(f"model {name} version {version} acknowledged twice")
            self.models[(name, version)] = digest
            self.report.acknowledged_writes += 1

    def verify(self, clients: Clients) -> list[str]:
        """What the mesh lost of the acknowledged writes (empty = nothing); recorded."""
        lost = list(self.conflicts)
        with self._lock:
            cache, datasets, models = dict(self.cache), dict(self.datasets), dict(self.models)
        for key, digest in cache.items():
            reply = clients.cache.Get(cache_pb2.GetRequest(key=key), timeout=10)
            if not reply.found or hashlib.sha256(reply.value).hexdigest() != digest:
                lost.append(f"cache {key.decode()}: {'changed' if reply.found else 'missing'}")
        for (name, version), (rows, column, checksum) in datasets.items():
            try:
                table = clients.read_dataset(name, version, deadline=30)
            except (flight.FlightError, pa.ArrowException) as exc:
                lost.append(f"dataset {name} v{version}: {code_of(exc)}")
                continue
            got = (table.num_rows, column_sum(table, column))
            if got != (rows, checksum):
                lost.append(f"dataset {name} v{version}: rows/checksum {got} != {(rows, checksum)}")
        for (name, version), digest in models.items():
            try:
                info = clients.gateway.GetModel(
                    trainer_pb2.GetModelRequest(name=name, version=version), timeout=10
                )
            except grpc.RpcError as exc:
                lost.append(f"model {name} v{version}: {exc.code().name}")
                continue
            if info.weights_digest != digest:
                lost.append(f"model {name} v{version}: digest changed")
        with self.report._lock:
            for item in lost:
                if item not in self.report.lost_writes:
                    self.report.lost_writes.append(item)
        return lost


def column_sum(table: pa.Table, column: str) -> int:
    return int(pc.sum(table[column]).as_py() or 0)


def check_whole(clients: Clients, report: Report = REPORT) -> list[str]:
    """No corrupt state: every dataset version listed reads whole (its rows), every model
    listed answers a prediction. Returns what is broken; recorded."""
    broken = []
    for info in clients.gateway.ListDatasets(
        gateway_pb2.ListDatasetsRequest(), timeout=10
    ).datasets:
        for version in info.versions or [info.version]:
            try:
                table = clients.read_dataset(info.name, version, deadline=30)
            except (flight.FlightError, pa.ArrowException) as exc:
                broken.append(f"dataset {info.name} v{version} unreadable: {code_of(exc)}")
                continue
            described = clients.describe(info.name, version)
            if table.num_rows != described.rows:
                broken.append(
                    f"dataset {info.name} v{version}: {table.num_rows} rows read, "
                    f"{described.rows} listed"
                )
    for model in clients.gateway.ListModels(trainer_pb2.ListModelsRequest(), timeout=10).models:
        rows = np.zeros((1, len(model.features)), dtype=np.float32)
        try:
            out = clients.infer(model.name, rows, deadline=15, version=model.version)
        except grpc.RpcError as exc:
            broken.append(f"model {model.name} v{model.version}: {exc.code().name}")
            continue
        if out.shape != (1, 1) or not np.isfinite(out).all():
            broken.append(f"model {model.name} v{model.version}: output {out!r}")
    with report._lock:
        report.corrupt.extend(b for b in broken if b not in report.corrupt)
    return broken


def infer_request(
    model: str, rows: np.ndarray, version: int = 0
) -> grpc_service_pb2.ModelInferRequest:
    """OIP ModelInfer with raw little-endian FP32 rows, as tritonclient.grpc sends them."""
    request = grpc_service_pb2.ModelInferRequest(
        model_name=model, model_version=str(version) if version else ""
    )
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype="<f4").tobytes())
    return request


# --- clients ---------------------------------------------------------------------------------


class Clients:
    """Outside clients of one mesh: the gateway (gRPC, Flight), the cache's gRPC for the
    ledger's Puts, and Flight clients by location for reads that follow a plan."""

    def __init__(self, mesh: MeshUnderTest):
        self.mesh = mesh
        self._channels: list[grpc.Channel] = []
        self.gateway = gateway_pb2_grpc.GatewayStub(self._channel(mesh.endpoint("gateway")))
        self.inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(
            self._channel(mesh.endpoint("gateway"))
        )
        self.cache = cache_pb2_grpc.CacheStub(self._channel(mesh.endpoint("cache")))
        self.flight = flight.connect(f"grpc+tcp://{mesh.endpoint('gateway', 'flight')}")
        self._flights: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    def _channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * MiB)]
        )
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self.flight.close()
        for client in self._flights.values():
            client.close()

    def flight_at(self, uri: str) -> flight.FlightClient:
        with self._lock:
            client = self._flights.get(uri)
            if client is None:
                client = self._flights[uri] = flight.connect(uri)
            return client

    # --- calls -----------------------------------------------------------------------------

    def infer(self, model: str, rows: np.ndarray, deadline: float, version: int = 0) -> np.ndarray:
        request = infer_request(model, rows, version)
        return self.infer_with_outcome(request, deadline)[0]

    def infer_with_outcome(
        self, request: grpc_service_pb2.ModelInferRequest, deadline: float
    ) -> tuple[np.ndarray, str]:
        """The outputs and the gateway's `onehop-cache` outcome (hit, partial, miss, bypass)."""
        reply, call = self.inference.ModelInfer.with_call(request, timeout=deadline)
        outcome = dict(call.trailing_metadata() or ()).get("onehop-cache", "")
        return np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(-1, 1), outcome

    def plan(self, name: str, version: int, deadline: float) -> flight.FlightInfo:
        descriptor = flight.FlightDescriptor.for_path(name, str(version))
        options = flight.FlightCallOptions(timeout=deadline)
        return self.flight.get_flight_info(descriptor, options)

    def read_dataset(self, name: str, version: int = 0, deadline: float = 10.0) -> pa.Table:
        """Plan at the gateway, then redeem each ticket at its locations in order, as any
        Flight client does (cache first; a cache that lost the shard moves on)."""
        ends = time.monotonic() + deadline
        info = self.plan(name, version, deadline)
        tables = []
        for endpoint in info.endpoints:
            error: BaseException | None = None
            for location in endpoint.locations:
                left = max(0.1, ends - time.monotonic())
                try:
                    reader = self.flight_at(location.uri.decode()).do_get(
                        endpoint.ticket, flight.FlightCallOptions(timeout=left)
                    )
                    tables.append(reader.read_all())
                    break
                except (flight.FlightError, pa.ArrowException) as exc:
                    error = exc
            else:
                assert error is not None
                raise error
        return pa.concat_tables(tables) if tables else pa.table({})

    def describe(self, name: str, version: int) -> data_pb2.DatasetInfo:
        body = data_pb2.DataRequest(dataset=name, version=version).SerializeToString()
        shard = flight.connect(f"grpc+tcp://{self.mesh.endpoint('shard', 'flight')}")
        try:
            result = next(iter(shard.do_action(flight.Action("describe", body))))
        finally:
            shard.close()
        return data_pb2.DatasetInfo.FromString(result.body.to_pybytes())

    def ingest(self, name: str, table: pa.Table, deadline: float) -> data_pb2.DatasetInfo:
        descriptor = flight.FlightDescriptor.for_path(name)
        options = flight.FlightCallOptions(timeout=deadline)
        writer, results = self.flight.do_put(descriptor, table.schema, options)
        try:
            writer.write_table(table)
            writer.done_writing()
            metadata = results.read()
        finally:
            writer.close()
        if metadata is None:
            raise Wrong("ingest acknowledged without a DatasetInfo")
        return data_pb2.DatasetInfo.FromString(metadata.to_pybytes())


# --- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    kind: str
    code: str
    started: float
    seconds: float
    deadline: float


class Load:
    """Workers on threads, each calling one operation in a loop with a per-call deadline;
    every outcome is kept (code, time taken) so a scenario can assert on them."""

    def __init__(self, report: Report = REPORT):
        self.report = report
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(
        self, kind: str, operation: Callable[[float], Any], deadline: float, pace: float = 0.05
    ) -> None:
        thread = threading.Thread(
            target=self._worker, args=(kind, operation, deadline, pace), name=kind, daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _worker(
        self, kind: str, operation: Callable[[float], Any], deadline: float, pace: float
    ) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                operation(deadline)
                code = "OK"
            except Wrong:
                code = "WRONG"
            except JobEnded:
                code = "JOB_FAILED"
            except Exception as exc:
                try:
                    code = code_of(exc)
                except Exception:
                    code = f"CLIENT:{type(exc).__name__}"
            call = Call(kind, code, started, time.monotonic() - started, deadline)
            with self._lock:
                self.calls.append(call)
            self.report.calls[f"{kind} {code}"] += 1
            self._stop.wait(pace)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        self._threads.clear()

    def mark(self) -> float:
        return time.monotonic()

    def ok_since(self, kind: str, since: float) -> int:
        with self._lock:
            return sum(c.kind == kind and c.code == "OK" and c.started >= since for c in self.calls)

    def window(self, kind: str, start: float, end: float) -> list[Call]:
        """The calls of `kind` that started in [start, end) and have finished."""
        with self._lock:
            return [c for c in self.calls if c.kind == kind and start <= c.started < end]

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.summary()}")
            time.sleep(0.1)

    def wait_ok(self, kinds: list[str], since: float, timeout: float = 120.0) -> None:
        """Each kind of worker has succeeded at least once since `since`."""
        self.wait(
            lambda: all(self.ok_since(kind, since) for kind in kinds),
            timeout,
            f"a success of each of {kinds}",
        )

    def summary(self) -> dict[str, dict[str, int]]:
        with self._lock:
            calls = list(self.calls)
        out: dict[str, Counter] = {}
        for call in calls:
            out.setdefault(call.kind, Counter())[call.code] += 1
        return {kind: dict(counts) for kind, counts in out.items()}

    def unexpected(self, allowed: dict[str, frozenset[str]]) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.code not in allowed.get(c.kind, FAULT_CODES)]

    def overruns(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if overran(c.seconds, c.deadline)]


class Workloads:
    """The operations the load runs: predictions, shard reads, ingests, cache Puts and
    training jobs — each acknowledged write entered in the ledger."""

    def __init__(self, clients: Clients, ledger: Ledger, features: int):
        self.clients = clients
        self.ledger = ledger
        self.rng = np.random.default_rng(1)
        self.pool = self.rng.normal(size=(64, features)).astype(np.float32)
        self._lock = threading.Lock()

    def predict(self, deadline: float) -> None:
        with self._lock:
            if self.rng.random() < 0.5:  # half repeat (cache hits), half are new rows
                rows = self.pool[self.rng.integers(0, len(self.pool), 4)]
            else:
                rows = self.rng.normal(size=(4, self.pool.shape[1])).astype(np.float32)
        out = self.clients.infer(MODEL, rows, deadline)
        if out.shape != (4, 1) or not ((out > 0) & (out < 1)).all():
            raise Wrong(f"prediction {out!r}")

    def predict_hit(self, deadline: float) -> None:
        """Rows of the warm pool only (see `warm_pool`): the cache answers, not the model."""
        with self._lock:
            rows = self.pool[self.rng.integers(0, len(self.pool), 4)]
        self._checked(rows, deadline)

    def predict_miss(self, deadline: float) -> None:
        """Rows never seen before: the model must answer."""
        with self._lock:
            rows = self.rng.normal(size=(4, self.pool.shape[1])).astype(np.float32)
        self._checked(rows, deadline)

    def _checked(self, rows: np.ndarray, deadline: float) -> str:
        out, outcome = self.clients.infer_with_outcome(infer_request(MODEL, rows), deadline)
        if out.shape != (len(rows), 1) or not ((out > 0) & (out < 1)).all():
            raise Wrong(f"prediction {out!r}")
        return outcome

    def warm_pool(self, timeout: float = 30.0) -> None:
        """Every pool row predicted and written back to the cache (the write-back lands after
        the response: ask again until the whole pool is a hit, bounded)."""
        deadline = time.monotonic() + timeout
        while self._checked(self.pool, 10.0) != "hit":
            if time.monotonic() > deadline:
                raise AssertionError("the prediction pool never became a cache hit")
            time.sleep(0.1)

    def read(self, deadline: float) -> None:
        table = self.clients.read_dataset(DATASET, 0, deadline)
        if table.num_rows != DATASET_ROWS:
            raise Wrong(f"read {table.num_rows} rows of {DATASET_ROWS}")

    def ingest(self, deadline: float, name: str = "ledger") -> None:
        with self._lock:
            base = int(self.rng.integers(0, 1 << 40))
        ids = np.arange(base, base + 300, dtype=np.int64)
        table = pa.table({"id": ids, "x": np.sin(ids).astype(np.float32)})
        info = self.clients.ingest(name, table, deadline)
        if info.rows != table.num_rows:
            raise Wrong(f"ingest acknowledged {info.rows} rows of {table.num_rows}")
        self.ledger.dataset(name, info.version, table.num_rows, "id", int(ids.sum()))

    def cache_put(self, deadline: float) -> None:
        key = f"rel/{uuid.uuid4().hex}".encode()
        value = os.urandom(1024)
        self.clients.cache.Put(cache_pb2.PutRequest(key=key, value=value), timeout=deadline)
        self.ledger.cache_put(key, value)

    def train(self, deadline: float, model: str = "rel-model") -> None:
        """One short job, followed by GetJob polls (each with the deadline) to its end."""
        request = trainer_pb2.StartJobRequest(
            dataset=DATASET,
            target=TARGET,
            model_name=model,
            hyperparameters=trainer_pb2.Hyperparameters(epochs=1, batch_size=256),
        )
        job_id = self.clients.gateway.StartJob(request, timeout=deadline).job_id
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            status = self.clients.gateway.GetJob(
                trainer_pb2.GetJobRequest(job_id=job_id), timeout=deadline
            )
            if status.state == trainer_pb2.JOB_STATE_SUCCEEDED:
                info = self.clients.gateway.GetModel(
                    trainer_pb2.GetModelRequest(name=model, version=status.model_version),
                    timeout=deadline,
                )
                self.ledger.model(model, status.model_version, info.weights_digest)
                return
            if status.state in (trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED):
                raise JobEnded(status.message)
            time.sleep(0.2)
        raise Wrong(f"job {job_id} still running after 120 s")


class JobEnded(Exception):
    """A job that ended without a model (its data source or worker died under it)."""


# A job whose data source or trainer died under it may end FAILED (or, with the trainer,
# be forgotten: NOT_FOUND) — what it had not registered was never acknowledged.
ALLOWED = {"train": FAULT_CODES | {"JOB_FAILED", "NOT_FOUND"}}
DEADLINES = {"predict": 5.0, "read": 10.0, "ingest": 20.0, "cache_put": 5.0, "train": 10.0}


def start_load(load: Load, workloads: Workloads) -> list[str]:
    """The mixed load of the kill matrix and the soak; returns the kinds it runs."""
    load.start("predict", workloads.predict, DEADLINES["predict"])
    load.start("predict", workloads.predict, DEADLINES["predict"])
    load.start("read", workloads.read, DEADLINES["read"], pace=0.2)
    load.start("ingest", workloads.ingest, DEADLINES["ingest"], pace=0.5)
    load.start("cache_put", workloads.cache_put, DEADLINES["cache_put"])
    load.start("train", workloads.train, DEADLINES["train"], pace=0.5)
    return ["predict", "read", "ingest", "cache_put", "train"]


def assert_calls_behaved(load: Load) -> None:
    """Every call ended within its deadline, with success or a code faults may cause."""
    summary = load.summary()
    hung = load.overruns()
    assert not hung, f"calls ran past their deadline: {hung[:5]}; all: {summary}"
    bad = load.unexpected(ALLOWED)
    assert not bad, f"calls failed with codes outside the table: {bad[:5]}; all: {summary}"


# --- seeding ---------------------------------------------------------------------------------


def seed(clients: Clients, ledger: Ledger) -> int:
    """The mesh's starting state: the credit dataset and a model trained on it. Returns the
    model's feature count."""
    table = credit_default(DATASET_ROWS, seed=3)
    info = clients.ingest(DATASET, table, deadline=60)
    ledger.dataset(DATASET, info.version, DATASET_ROWS, "AGE", column_sum(table, "AGE"))
    workloads = Workloads(clients, ledger, features=1)
    workloads.train(deadline=30, model=MODEL)
    model = clients.gateway.GetModel(trainer_pb2.GetModelRequest(name=MODEL), timeout=10)
    return len(model.features)


def write_report(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, default=str))
