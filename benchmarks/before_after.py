"""Before and after, as the seed promises it: the same job — ingest, train twice, read the
dataset twice, serve a repeating request mix — on a mesh with the cache off and on, and the
serving side at rising concurrency with dynamic batching off and on.

Each side is a real mesh (`onehop.launcher.Mesh`, one process per service); batching off is
the cache-off mesh again with its trainer restarted unbatched. CPU-seconds come
from process accounting (/proc through psutil) of the gateway, trainer, cache and shard
processes, bytes moved from the loopback interface's counters (in a network namespace of the
benchmark's own where `onehop bench` can make one), each read before and after a phase. It
always starts its own meshes: the cache cannot be switched off in a running one, so
``ctx.target`` is not used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

from onehop.benchmark import (
    CONCURRENCY,
    DATA_WAIT,
    HIT_RATE,
    LATENCY_MS,
    LOSS,
    THROUGHPUT,
    BenchContext,
    Figure,
    run_standalone,
    series,
)
from onehop.channels import aio_channel
from onehop.client import GatewayClient, read_batches
from onehop.dataset import TARGET, credit_default, write_csv
from onehop.demo import ReadPass, _cache_flight_locations, _wait_cached, read_plan
from onehop.launcher import SERVICES, Mesh
from onehop.settings import Settings
from onehop.training_view import job_request
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import data_pb2, trainer_pb2

DATASET = "credit-default"
MODEL = "default-risk"
CACHE_OFF, CACHE_ON = "cache off", "cache on"
BATCHING_OFF, BATCHING_ON = "batching off", "batching on"
# The trainer's dynamic batcher with a largest batch of one row is no batching at all.
NO_BATCHING_ENV = {"ONEHOP_TRAINER_MAX_BATCH_SIZE": "1"}
LOOPBACK = "bytes through the loopback interface during the phase (every hop of the mesh)"
_TERMINAL = {
    trainer_pb2.JOB_STATE_SUCCEEDED,
    trainer_pb2.JOB_STATE_FAILED,
    trainer_pb2.JOB_STATE_CANCELLED,
}


@dataclass(frozen=True)
class Sizes:
    rows: int
    epochs: int
    batch_size: int
    pool: int  # distinct request batches the mix draws from
    requests: int  # requests in the mix
    rows_per_request: int
    concurrency: tuple[int, ...]
    requests_per_level: int
    zipf: float = 1.1


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(8_000, 1, 256, 24, 120, 8, (1, 8, 32), 96)
    return Sizes(120_000, 3, 256, 200, 1000, 8, (1, 4, 16, 64), 640)


# --- process accounting ----------------------------------------------------------------------


@dataclass
class Usage:
    """CPU-seconds of each service process over one phase, and the bytes that crossed the
    loopback interface meanwhile (every hop of the mesh, and its client, is on 127.0.0.1)."""

    cpu_seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu_seconds.values())


def _loopback_bytes() -> int:
    counters = psutil.net_io_counters(pernic=True)
    return counters["lo"].bytes_recv if "lo" in counters else 0


class Meter:
    """Reads each service's CPU time (user + system, all threads) from /proc before and
    after a phase, and the loopback interface's byte counter. gRPC and Flight use
    sendmsg/recvmsg, which per-process I/O counters (rchar/wchar) miss; the interface counts
    every byte, headers included — only the mesh's in a private network namespace."""

    def __init__(self, mesh: Mesh):
        self._processes = {
            name: psutil.Process(child.process.pid) for name, child in mesh.children.items()
        }

    def _cpu(self) -> dict[str, float]:
        readings = {}
        for name, process in self._processes.items():
            cpu = process.cpu_times()
            readings[name] = cpu.user + cpu.system
        return readings

    @contextmanager
    def measure(self) -> Iterator[Usage]:
        usage = Usage()
        before, lo_before = self._cpu(), _loopback_bytes()
        yield usage
        after, usage.bytes = self._cpu(), _loopback_bytes() - lo_before
        usage.cpu_seconds = {name: round(cpu - before[name], 4) for name, cpu in after.items()}


# --- the phases --------------------------------------------------------------------------------


@dataclass
class Training:
    seconds: float
    samples_per_second: float
    data_wait_share: float
    usage: Usage
    status: trainer_pb2.JobStatus  # the job's own cost accounting: cpu_seconds, bytes_read


def train(ctx: BenchContext, client: GatewayClient, meter: Meter, s: Sizes, label: str) -> Training:
    """One job through the gateway, followed to its end; loss and data wait recorded."""
    request = job_request(
        dataset=DATASET, target=TARGET, model=MODEL, epochs=s.epochs, batch_size=s.batch_size
    )
    losses, waits = [], []
    with meter.measure() as usage:
        job_id = client.start_job(request)
        last = trainer_pb2.JobStatus()
        for last in client.watch_job(job_id):
            if last.step:
                losses.append(last.loss)
                waits.append(last.data_wait_share)
            if last.state in _TERMINAL:
                break
    if last.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"training job {job_id} ended {last.state}: {last.message}")
    ctx.record(series(LOSS, label), losses)
    ctx.record(series(DATA_WAIT, label), waits)
    return Training(
        last.elapsed_seconds, last.samples_per_second, last.data_wait_share, usage, last
    )


def read_twice(
    client: GatewayClient, settings: Settings, cached: bool
) -> tuple[ReadPass, ReadPass]:
    """The standardised dataset read whole along the gateway's plan, twice: the second read is
    what a repeated epoch or a second consumer gets."""
    request = data_pb2.DataRequest(
        dataset=DATASET,
        preprocess=data_pb2.Preprocessing(scaling=data_pb2.SCALING_STANDARD, passthrough=[TARGET]),
    )
    locations = _cache_flight_locations(settings)
    first = read_plan(client.plan(request), locations)
    # Write-through to the cache is asynchronous: re-plan until the cache lists every shard.
    info = _wait_cached(client, request) if cached else client.plan(request)
    return first, read_plan(info, locations)


@dataclass
class Calls:
    seconds: list[float]
    outcomes: list[str]
    wall: float


async def _infer_all(
    address: str, settings: Settings, requests: list[np.ndarray], concurrency: int
) -> Calls:
    """OIP ModelInfer over gRPC with raw tensors, `concurrency` requests in flight."""
    seconds = [0.0] * len(requests)
    outcomes = [""] * len(requests)
    pending = iter(range(len(requests)))
    async with aio_channel(address, settings) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            for i in pending:
                rows = requests[i]
                message = pb.ModelInferRequest(
                    model_name=MODEL,
                    inputs=[
                        pb.ModelInferRequest.InferInputTensor(
                            name="input", datatype="FP32", shape=list(rows.shape)
                        )
                    ],
                    raw_input_contents=[rows.tobytes()],
                )
                started = time.perf_counter()
                call = stub.ModelInfer(message, timeout=30)
                await call
                seconds[i] = time.perf_counter() - started
                outcomes[i] = dict(await call.trailing_metadata()).get("onehop-cache", "")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Calls(seconds, outcomes, wall)


def infer_all(
    address: str, settings: Settings, requests: list[np.ndarray], concurrency: int = 1
) -> Calls:
    return asyncio.run(_infer_all(address, settings, requests, concurrency))


def answered_again(
    address: str, settings: Settings, requests: list[np.ndarray], timeout: float = 30.0
) -> None:
    """The requests, repeated while the gateway cannot reach a restarted trainer yet: its
    channel reconnects once its backoff after the refused connections has passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            infer_all(address, settings, requests)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def request_mix(rows: np.ndarray, s: Sizes) -> list[np.ndarray]:
    """`requests` draws from `pool` distinct batches, Zipf-skewed as real traffic repeats."""
    pool = np.split(rows[: s.pool * s.rows_per_request], s.pool)
    rank = np.arange(1, s.pool + 1, dtype=np.float64)
    weights = rank**-s.zipf / np.sum(rank**-s.zipf)
    picks = np.random.default_rng(0).choice(s.pool, size=s.requests, p=weights)
    return [pool[i] for i in picks]


def hit_rate_over_time(outcomes: list[str], windows: int = 20) -> list[float]:
    return [
        float(np.mean([o == "hit" for o in part])) for part in np.array_split(outcomes, windows)
    ]


@dataclass
class Sweep:
    throughput: dict[int, float] = field(default_factory=dict)
    p99_ms: dict[int, float] = field(default_factory=dict)
    usage: dict[int, Usage] = field(default_factory=dict)


def sweep(
    ctx: BenchContext,
    address: str,
    settings: Settings,
    meter: Meter,
    requests: list[np.ndarray],
    s: Sizes,
    label: str,
) -> Sweep:
    """Throughput and p99 at each concurrency level over the same single-row requests."""
    result = Sweep()
    for level in s.concurrency:
        with meter.measure() as usage:
            calls = infer_all(address, settings, requests, level)
        result.throughput[level] = len(requests) / calls.wall
        result.p99_ms[level] = float(np.percentile(calls.seconds, 99) * 1000)
        result.usage[level] = usage
    ctx.record(series(CONCURRENCY, label), [float(c) for c in s.concurrency])
    ctx.record(series(THROUGHPUT, label), [result.throughput[c] for c in s.concurrency])
    return result


# --- one side of the table ---------------------------------------------------------------------


@dataclass
class Side:
    cold: Training
    warm: Training
    first_read: ReadPass
    second_read: ReadPass
    mix: Calls
    mix_usage: Usage
    predictions: int
    sweep: Sweep
    unbatched: Sweep | None  # the same sweep with batching off (cache-off side only)


def mesh_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        gateway_http_port=0,
        gateway_grpc_port=0,
        gateway_flight_port=0,
        grace_seconds=0.5,
        cache_size_bytes=256 << 20,
    )


@contextmanager
def running(settings: Settings, cached: bool) -> Iterator[Mesh]:
    services = SERVICES if cached else tuple(s for s in SERVICES if s.name != "cache")
    mesh = Mesh(settings, say=lambda line: None, services=services)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


def measure_side(
    ctx: BenchContext, s: Sizes, csv_path: Path, held_out: np.ndarray, label: str
) -> Side:
    """One mesh (cached or not) through the whole job; what each phase took and cost.
    Without the cache, the sweep is measured again with the trainer restarted unbatched
    (the model stays registered; the gateway and shard keep running)."""
    cached = label == CACHE_ON
    settings = mesh_settings(ctx.workdir / label.replace(" ", "-"))
    with running(settings, cached) as mesh:
        meter = Meter(mesh)
        address = mesh.children["gateway"].endpoints["grpc"]
        with GatewayClient(settings, timeout=120) as client:
            client.ingest(read_batches(csv_path), DATASET)
            cold = train(ctx, client, meter, s, f"{label}, first job")
            warm = train(ctx, client, meter, s, f"{label}, repeat job")
            first_read, second_read = read_twice(client, settings, cached)

        mix = request_mix(held_out, s)
        with meter.measure() as mix_usage:
            calls = infer_all(address, settings, mix)
        for outcome in sorted(set(calls.outcomes)):
            chosen = [
                t * 1000 for t, o in zip(calls.seconds, calls.outcomes, strict=True) if o == outcome
            ]
            ctx.record(series(LATENCY_MS, f"{label}: {outcome}"), chosen)
        ctx.record(series(HIT_RATE, label), hit_rate_over_time(calls.outcomes))

        # With the cache on, the sweep repeats one row (every call a hit after the first);
        # with it off, every call reaches the model, as the batching comparison needs.
        singles = [held_out[-1:]] * s.requests_per_level if cached else single_rows(held_out, s)
        infer_all(address, settings, singles[:1])  # load and warm the model
        kind = "one repeated row" if cached else BATCHING_ON
        swept = sweep(ctx, address, settings, meter, singles, s, f"{label}, {kind}")
        unbatched = None
        if not cached:
            mesh.restart("trainer", NO_BATCHING_ENV)
            answered_again(address, settings, singles[:1])
            # A new trainer process: a new meter to read its CPU time.
            label_off = f"{label}, {BATCHING_OFF}"
            unbatched = sweep(ctx, address, settings, Meter(mesh), singles, s, label_off)
    return Side(
        cold,
        warm,
        first_read,
        second_read,
        calls,
        mix_usage,
        len(mix) * s.rows_per_request,
        swept,
        unbatched,
    )


def single_rows(held_out: np.ndarray, s: Sizes) -> list[np.ndarray]:
    return [held_out[i : i + 1] for i in range(s.requests_per_level)]


# --- figures -------------------------------------------------------------------------------------


def _p(calls: Calls, q: float, outcome: str | None = None) -> float:
    chosen = [t for t, o in zip(calls.seconds, calls.outcomes, strict=True) if outcome in (None, o)]
    return float(np.percentile(chosen, q) * 1000) if chosen else float("nan")


def _hit_share(calls: Calls) -> float:
    return 100.0 * sum(o == "hit" for o in calls.outcomes) / len(calls.outcomes)


def figures(s: Sizes, off: Side, on: Side, private: bool) -> list[Figure]:
    job = {"rows": s.rows, "epochs": s.epochs, "batch_size": s.batch_size, "model": "seed MLP"}
    mix = {
        "requests": s.requests,
        "rows_per_request": s.rows_per_request,
        "distinct_batches": s.pool,
        "zipf": s.zipf,
        "client": "OIP gRPC, raw tensors, one at a time",
    }

    def versus(name: str, unit: str, value: float, baseline: float, **conditions: object) -> Figure:
        return Figure(name, value, unit, baseline, CACHE_OFF, conditions=conditions)

    def per_1k(amount: float, predictions: int) -> float:
        return amount * 1000 / predictions

    top = max(s.concurrency)
    assert off.unbatched is not None
    unbatched = off.unbatched
    loopback = "private (own network namespace)" if private else "shared with this machine"
    result = [
        versus(
            "training time, repeat job",
            "s",
            on.warm.seconds,
            off.warm.seconds,
            **job,
            first_job_s={CACHE_ON: on.cold.seconds, CACHE_OFF: off.cold.seconds},
            samples_per_second={
                CACHE_ON: on.warm.samples_per_second,
                CACHE_OFF: off.warm.samples_per_second,
            },
        ),
        versus(
            "training data-wait share, repeat job",
            "%",
            100 * on.warm.data_wait_share,
            100 * off.warm.data_wait_share,
            **job,
        ),
        versus(
            "CPU-seconds, repeat training job",
            "s",
            on.warm.usage.total_cpu,
            off.warm.usage.total_cpu,
            **job,
            by_service={CACHE_ON: on.warm.usage.cpu_seconds, CACHE_OFF: off.warm.usage.cpu_seconds},
            # What the trainer itself reports for the job (JobStatus), beside /proc.
            job_reported={
                side: {"cpu_seconds": t.status.cpu_seconds, "gpu_seconds": t.status.gpu_seconds}
                for side, t in ((CACHE_ON, on.warm), (CACHE_OFF, off.warm))
            },
        ),
        versus(
            "bytes moved, repeat training job",
            "MB",
            on.warm.usage.bytes / 1e6,
            off.warm.usage.bytes / 1e6,
            **job,
            job_bytes_read={
                CACHE_ON: on.warm.status.bytes_read,
                CACHE_OFF: off.warm.status.bytes_read,
            },
            source=LOOPBACK,
            loopback=loopback,
        ),
        versus(
            "data access time, second full read",
            "s",
            on.second_read.seconds,
            off.second_read.seconds,
            rows=on.second_read.rows,
            megabytes=round(on.second_read.bytes / 1e6, 2),
            first_read_s={CACHE_ON: on.first_read.seconds, CACHE_OFF: off.first_read.seconds},
            shards=on.second_read.endpoints,
        ),
        versus(
            "data hit rate, second full read",
            "%",
            100 * on.second_read.from_cache / on.second_read.endpoints,
            100 * off.second_read.from_cache / off.second_read.endpoints,
        ),
        versus("inference p50, request mix", "ms", _p(on.mix, 50), _p(off.mix, 50), **mix),
        versus(
            "inference p99, request mix",
            "ms",
            _p(on.mix, 99),
            _p(off.mix, 99),
            **mix,
            hit_p50_ms=_p(on.mix, 50, "hit"),
            miss_p50_ms=_p(on.mix, 50, "miss"),
        ),
        versus(
            "prediction hit rate, request mix", "%", _hit_share(on.mix), _hit_share(off.mix), **mix
        ),
        versus(
            "CPU-seconds per 1,000 predictions",
            "s",
            per_1k(on.mix_usage.total_cpu, on.predictions),
            per_1k(off.mix_usage.total_cpu, off.predictions),
            **mix,
            by_service={CACHE_ON: on.mix_usage.cpu_seconds, CACHE_OFF: off.mix_usage.cpu_seconds},
        ),
        versus(
            "bytes moved per 1,000 predictions",
            "KB",
            per_1k(on.mix_usage.bytes, on.predictions) / 1e3,
            per_1k(off.mix_usage.bytes, off.predictions) / 1e3,
            **mix,
            source=LOOPBACK,
            loopback=loopback,
        ),
    ]
    batched, sweep_conditions = (
        off.sweep,
        {
            "concurrency": top,
            "requests": s.requests_per_level,
            "rows_per_request": 1,
            "cache": "off",
            "throughput_by_concurrency": {
                BATCHING_ON: off.sweep.throughput,
                BATCHING_OFF: unbatched.throughput,
            },
            "batching_on": {
                "max_batch_size": Settings().trainer_max_batch_size,
                "max_queue_delay_ms": Settings().trainer_max_queue_delay_ms,
            },
            "batching_off": {"max_batch_size": 1},
        },
    )
    result += [
        Figure(
            f"inference throughput, {top} concurrent single rows",
            batched.throughput[top],
            "req/s",
            unbatched.throughput[top],
            BATCHING_OFF,
            conditions=sweep_conditions,
        ),
        Figure(
            f"inference p99, {top} concurrent single rows",
            batched.p99_ms[top],
            "ms",
            unbatched.p99_ms[top],
            BATCHING_OFF,
            conditions=sweep_conditions,
        ),
        Figure(
            f"CPU-seconds per 1,000 predictions, {top} concurrent",
            per_1k(batched.usage[top].total_cpu, s.requests_per_level),
            "s",
            per_1k(unbatched.usage[top].total_cpu, s.requests_per_level),
            BATCHING_OFF,
            conditions={
                **sweep_conditions,
                "by_service": {
                    BATCHING_ON: batched.usage[top].cpu_seconds,
                    BATCHING_OFF: unbatched.usage[top].cpu_seconds,
                },
            },
        ),
    ]
    return result


def run(ctx: BenchContext) -> list[Figure]:
    """The seed's before/after table: cache off vs on, batching off vs on."""
    s = sizes(ctx.quick)
    table = credit_default(s.rows)
    csv_path = ctx.workdir / "credit_default.csv"
    write_csv(table, csv_path)
    features = [c for c in table.column_names if c != TARGET]
    held_out = np.column_stack([table[f].to_numpy() for f in features]).astype(np.float32)[::-1]
    held_out = np.ascontiguousarray(
        held_out[: max(s.pool * s.rows_per_request, s.requests_per_level)]
    )

    off = measure_side(ctx, s, csv_path, held_out, CACHE_OFF)
    on = measure_side(ctx, s, csv_path, held_out, CACHE_ON)
    return figures(s, off, on, ctx.private_network)


if __name__ == "__main__":
    raise SystemExit(run_standalone(run))
