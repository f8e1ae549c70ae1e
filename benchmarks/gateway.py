"""The gateway against what a user would otherwise run, in one sitting (issue 6):

- hit-path p50 over HTTP (OIP JSON, and the binary-tensor extension tritonclient.http uses)
  and gRPC vs a bare endpoint of the same framework answering a constant (FastAPI on
  uvicorn; grpc.aio): the same request repeated (the prebuilt answer), and the same rows
  in a new order each call (every row a row-cache hit, the answer built afresh);
- miss-path p50 over gRPC vs calling the trainer's OIP endpoint directly;
- throughput of 64 concurrent gRPC clients, 100% hits (vs the bare grpc.aio constant) and
  100% misses (vs the trainer directly);
- effective throughput of a Zipf(0.99) row mix vs the same mix through a gateway with the
  cache disabled;
- overload at 4x the admitted concurrency (misses): p99 of admitted requests vs p99 at the
  admitted concurrency, and the share refused fast (RESOURCE_EXHAUSTED, with its p99).

The mesh runs as processes (`onehop.launcher.Mesh`, as `onehop up` starts it, the gateway
reading hits from the cache's memory map); the uncached gateway and the bare servers are
processes too. Clients run here: synchronous and one call in flight for latencies, grpc.aio
tasks for throughput, the same client for a figure's value and its baseline.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa

from gateway import tensors
from onehop.benchmark import (
    CONCURRENCY,
    LATENCY_MS,
    THROUGHPUT,
    BenchContext,
    Figure,
    run_standalone,
    series,
)
from onehop.channels import aio_channel, sync_channel
from onehop.client import GatewayClient
from onehop.launcher import SERVICES, Mesh
from onehop.settings import Settings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import trainer_pb2

DATASET = "bench-rows"
MODEL = "bench-model"
N_FEATURES = 8
BATCH = 8  # rows per request on the hit and miss paths
CLIENTS = 64
# Admitted concurrency of the gateway the overload runs against (its queue: a quarter, as
# the defaults have it).
ADMITTED = 8
ZIPF_S = 0.99
ZIPF_ROWS = 4  # rows per request in the Zipf mix
# A rejected client waits this long before trying again (a client honouring Retry-After,
# scaled down so the overload stays an overload).
BACKOFF_S = 0.05

# FastAPI on uvicorn and a grpc.aio server, configured as the gateway's are, answering every
# infer call with the constant bytes the gateway answers the hit request with.
BARE_SERVERS = """
import asyncio, sys
import uvicorn
from fastapi import FastAPI, Request, Response
import grpc
from protos.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc

# Started ahead of time: the paths of the bodies to answer with come as stdin's first line.
paths = sys.stdin.readline().split()
json_body, binary_body, binary_length, grpc_body = (open(p, "rb").read() for p in paths)
app = FastAPI()

@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> Response:
    await request.body()
    return Response(json_body, media_type="application/json")

@app.post("/v2/models/{name}/versions/{version}/infer")
async def infer_binary(name: str, version: str, request: Request) -> Response:
    await request.body()
    headers = {"Inference-Header-Content-Length": binary_length.decode()}
    return Response(binary_body, media_type="application/octet-stream", headers=headers)

class Bare(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self):
        self.response = pb.ModelInferResponse.FromString(grpc_body)

    async def ModelInfer(self, request, context):
        return self.response

async def main():
    server = grpc.aio.server()
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # uvicorn binds as the gateway's does: a socket made here without IPPROTO_TCP would
    # not get TCP_NODELAY from asyncio, and every answer would wait for a delayed ACK.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"
    )
    web = uvicorn.Server(config)
    task = asyncio.create_task(web.serve())
    while not web.started:
        await asyncio.sleep(0.01)
    print(web.servers[0].sockets[0].getsockname()[1], grpc_port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    web.should_exit = True
    await task
    await server.stop(0)

asyncio.run(main())
"""


@dataclass(frozen=True)
class Sizes:
    latency_calls: int
    miss_calls: int
    seconds: float  # per throughput run
    overload_seconds: float
    zipf_universe: int
    train_rows: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(60, 30, 0.4, 0.6, 400, 1000)
        return cls(2000, 1000, 5.0, 10.0, 20_000, 4000)


@dataclass
class Calls:
    """What a closed-loop run saw: latencies (s) by outcome, and its wall time."""

    seconds: float
    latencies: dict[str, list[float]]

    def count(self, outcome: str) -> int:
        return len(self.latencies.get(outcome, []))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.latencies.values())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- setting up ------------------------------------------------------------------------------


def _table(rows: int) -> pa.Table:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(rows, N_FEATURES))
    label = (x @ rng.normal(size=N_FEATURES) > 0).astype(np.int64)
    columns = {f"x{i}": x[:, i] for i in range(N_FEATURES)}
    return pa.table({**columns, "label": label})


def _train(settings: Settings, rows: int) -> None:
    with GatewayClient(settings, timeout=120) as client:
        table = _table(rows)
        client.ingest(pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), DATASET)
        job = client.start_job(
            trainer_pb2.StartJobRequest(
                dataset=DATASET,
                target="label",
                model_name=MODEL,
                hyperparameters=trainer_pb2.Hyperparameters(epochs=1, batch_size=256),
            )
        )
        final = None
        for status in client.watch_job(job):
            final = status
        if final is None or final.state != trainer_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"training the benchmark model failed: {final}")


# A short drain: nothing is in flight when a benchmark stops its services.
QUIET = {"ONEHOP_GRACE_SECONDS": "0.5", "ONEHOP_LOG_LEVEL": "WARNING"}
ONLY_GATEWAY = tuple(spec for spec in SERVICES if spec.name == "gateway")


@contextmanager
def _mesh(settings: Settings) -> Iterator[Mesh]:
    mesh = Mesh(settings, say=lambda line: None, env=QUIET)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


@contextmanager
def _gateways(configs: list[tuple[Settings, dict[str, str]]]) -> Iterator[Callable[[], list[Mesh]]]:
    """Gateway-only meshes, one per (settings, environment), started in threads while the
    caller goes on (each start mostly waits on its child's imports and health); the yielded
    function waits until they all serve and returns them. All are stopped at the end."""
    meshes = [
        Mesh(settings, say=lambda line: None, services=ONLY_GATEWAY, env={**QUIET, **env})
        for settings, env in configs
    ]
    with ThreadPoolExecutor(len(meshes)) as pool:
        starts = [pool.submit(mesh.start) for mesh in meshes]

        def ready() -> list[Mesh]:
            for start in starts:
                start.result()
            return meshes

        try:
            yield ready
        finally:
            for start in starts:
                start.exception()  # a mesh is stopped once its start has returned
            list(pool.map(Mesh.stop, meshes))


@contextmanager
def _bare_servers(workdir: Path) -> Iterator[Callable[[list[bytes]], tuple[str, str]]]:
    """The bare servers' process, started at once so that its imports overlap the setup.
    The yielded function hands it the bodies to answer with and returns (HTTP address,
    gRPC address) once both listen."""
    process = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVERS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def serve(bodies: list[bytes]) -> tuple[str, str]:
        paths = []
        for index, body in enumerate(bodies):
            path = workdir / f"bare-{index}.bin"
            path.write_bytes(body)
            paths.append(str(path))
        stdin.write((" ".join(paths) + "\n").encode())
        stdin.flush()
        line = stdout.readline().decode().split()
        if len(line) != 2:
            raise RuntimeError("the bare servers did not start")
        return f"127.0.0.1:{line[0]}", f"127.0.0.1:{line[1]}"

    try:
        yield serve
    finally:
        stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- requests -----------------------------------------------------------------------------


def grpc_request(rows: np.ndarray) -> pb.ModelInferRequest:
    """As tritonclient.grpc sends it: raw_input_contents."""
    return tensors.grpc_infer_request(MODEL, "", rows)


def json_body(rows: np.ndarray) -> bytes:
    document = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ]
    }
    return json.dumps(document).encode()


def binary_body(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """As tritonclient.http sends it by default: binary in, binary out."""
    blob = np.ascontiguousarray(rows, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


class HttpClient:
    """One keep-alive connection, one request in flight (http.client: the least overhead)."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict]:
        self.connection.request("POST", path, body, {"Content-Type": "application/json", **headers})
        response = self.connection.getresponse()
        content = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {content[:200]!r}")
        return content, {name.lower(): value for name, value in response.getheaders()}

    def close(self) -> None:
        self.connection.close()


def sequential(call: Callable[[], object], n: int) -> list[float]:
    """Latencies (s) of `n` calls one after another."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def interleaved(
    ours: Callable[[], object], theirs: Callable[[], object], n: int, rounds: int = 10
) -> tuple[list[float], list[float]]:
    """`n` latencies of each side, taken in alternating blocks after a warm-up, so that
    drift on a shared machine falls on both sides alike."""
    sequential(ours, 10)
    sequential(theirs, 10)
    value: list[float] = []
    baseline: list[float] = []
    for _ in range(rounds):
        value += sequential(ours, n // rounds)
        baseline += sequential(theirs, n // rounds)
    return value, baseline


async def _closed_loop(
    address: str,
    settings: Settings,
    make_request: Callable[[], pb.ModelInferRequest],
    clients: int,
    seconds: float,
) -> Calls:
    """`clients` concurrent callers, each sending its next request as soon as the last is
    answered (a refused one after BACKOFF_S), for `seconds`."""
    channels = [aio_channel(address, settings) for _ in range(4)]
    stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
    latencies: dict[str, list[float]] = {}
    end = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while time.perf_counter() < end:
            request = make_request()
            started = time.perf_counter()
            try:
                call = stub.ModelInfer(request, timeout=30)
                await call
                metadata = dict(await call.trailing_metadata() or ())
                outcome = str(metadata.get("onehop-cache", "ok"))
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name.lower()
            latencies.setdefault(outcome, []).append(time.perf_counter() - started)
            if outcome == "resource_exhausted":
                await asyncio.sleep(BACKOFF_S)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        for channel in channels:
            await channel.close()
    return Calls(time.perf_counter() - started, latencies)


def closed_loop(
    address: str,
    settings: Settings,
    make_request: Callable[[], pb.ModelInferRequest],
    clients: int,
    seconds: float,
) -> Calls:
    return asyncio.run(_closed_loop(address, settings, make_request, clients, seconds))


def fresh_rows(rng: np.random.Generator, n: int = BATCH) -> Callable[[], pb.ModelInferRequest]:
    return lambda: grpc_request(rng.normal(size=(n, N_FEATURES)).astype(np.float32))


# --- the run --------------------------------------------------------------------------------


def run(ctx: BenchContext) -> list[Figure]:
    """Gateway: hit and miss p50 vs bare endpoints and the trainer, throughput, Zipf mix
    with and without the cache, overload."""
    s = Sizes.of(ctx.quick)
    rng = np.random.default_rng(5)
    settings = Settings(
        data_dir=ctx.workdir / "mesh",
        gateway_http_port=0,
        gateway_grpc_port=0,
        gateway_flight_port=0,
        grace_seconds=0.5,
        cache_size_bytes=256 << 20,
        log_level="WARNING",
    )
    with _mesh(settings) as mesh:
        trainer = mesh.children["trainer"].endpoints["grpc"]
        # Two gateways of their own on the same trainer and shard, started meanwhile: one
        # without the cache (the Zipf baseline) and one admitting few requests at once (the
        # overload, so that 4x its admitted concurrency is load this client can offer).
        env = {
            "ONEHOP_TRAINER_ADDRESS": trainer,
            "ONEHOP_SHARD_ADDRESS": mesh.children["shard"].endpoints["flight"],
            "ONEHOP_SHARD_HEALTH_ADDRESS": mesh.children["shard"].endpoints["grpc"],
        }
        limits = {
            "ONEHOP_MAX_CONCURRENT_REQUESTS": str(ADMITTED),
            "ONEHOP_MAX_QUEUED_REQUESTS": str(ADMITTED // 4),
        }
        side_gateways = _gateways(
            [
                (settings.model_copy(update={"data_dir": ctx.workdir / "uncached"}), env),
                (settings.model_copy(update={"data_dir": ctx.workdir / "limited"}), env | limits),
            ]
        )
        with side_gateways as side_gateways_ready, _bare_servers(ctx.workdir) as bare_servers:
            return _measure(ctx, s, rng, settings, mesh, side_gateways_ready, bare_servers)


def _measure(
    ctx: BenchContext,
    s: Sizes,
    rng: np.random.Generator,
    settings: Settings,
    mesh: Mesh,
    side_gateways_ready: Callable[[], list[Mesh]],
    bare_servers: Callable[[list[bytes]], tuple[str, str]],
) -> list[Figure]:
    """Every figure: on the running mesh (against the bare servers answering its own hit
    answers, and the trainer directly), then on the side gateways."""
    gateway = mesh.children["gateway"].endpoints
    trainer = mesh.children["trainer"].endpoints["grpc"]
    figures: list[Figure] = []
    _train(settings, s.train_rows)

    hot = rng.normal(size=(BATCH, N_FEATURES)).astype(np.float32)
    http_client = HttpClient(gateway["http"])
    channel = sync_channel(gateway["grpc"], settings)
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    json_request = json_body(hot)
    binary_request, binary_headers = binary_body(hot)
    hit_request = grpc_request(hot)
    path = f"/v2/models/{MODEL}/infer"
    _wait_for_hit(http_client, path, json_request)
    json_answer, _ = http_client.post(path, json_request, {})
    binary_answer, headers = http_client.post(path, binary_request, binary_headers)
    grpc_answer = stub.ModelInfer(hit_request, timeout=30)
    bodies = [
        json_answer,
        binary_answer,
        headers["inference-header-content-length"].encode(),
        grpc_answer.SerializeToString(),
    ]

    bare_http, bare_grpc = bare_servers(bodies)
    figures += _hit_latency(ctx, s, http_client, stub, bare_http, bare_grpc, settings, path, hot)
    figures += _throughput_hits(ctx, s, gateway["grpc"], bare_grpc, settings, hit_request)
    http_client.close()

    figures += _miss_latency(ctx, s, stub, trainer, settings, rng)
    figures += _throughput_misses(ctx, s, gateway["grpc"], trainer, settings, rng)
    channel.close()

    plain, small = side_gateways_ready()
    figures += _zipf(ctx, s, gateway["grpc"], plain.children["gateway"].endpoints["grpc"], settings)
    figures += _overload(ctx, s, small.children["gateway"].endpoints["grpc"], settings, rng)
    return figures


def _wait_for_hit(client: HttpClient, path: str, body: bytes, attempts: int = 200) -> None:
    """The first call misses and writes back after answering: wait until a call hits."""
    for _ in range(attempts):
        _, headers = client.post(path, body, {})
        if headers.get("onehop-cache") == "hit":
            return
        time.sleep(0.02)
    raise RuntimeError("the hot rows never became a cache hit")


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _hit_latency(
    ctx: BenchContext,
    s: Sizes,
    http_client: HttpClient,
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub,
    bare_http: str,
    bare_grpc: str,
    settings: Settings,
    path: str,
    hot: np.ndarray,
) -> list[Figure]:
    bare = HttpClient(bare_http)
    bare_channel = sync_channel(bare_grpc, settings)
    bare_stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(bare_channel)
    json_request = json_body(hot)
    binary_request, binary_headers = binary_body(hot)
    # The bare app answers binary on the versioned route, so one app holds both constants.
    bare_binary_path = f"/v2/models/{MODEL}/versions/1/infer"
    request = grpc_request(hot)
    shuffle = np.random.default_rng(17)
    runs = {
        "HTTP JSON": (
            lambda: http_client.post(path, json_request, {}),
            lambda: bare.post(path, json_request, {}),
            "bare FastAPI constant",
        ),
        "HTTP binary": (
            lambda: http_client.post(path, binary_request, binary_headers),
            lambda: bare.post(bare_binary_path, binary_request, binary_headers),
            "bare FastAPI constant",
        ),
        "gRPC": (
            lambda: stub.ModelInfer(request, timeout=30),
            lambda: bare_stub.ModelInfer(request, timeout=30),
            "bare grpc.aio constant",
        ),
        # The cached rows in a new order each call: new request bytes, so no prebuilt
        # answer; every row is found in the row cache and the answer is built afresh.
        "gRPC, rows reordered": (
            lambda: stub.ModelInfer(grpc_request(hot[shuffle.permutation(BATCH)]), timeout=30),
            lambda: bare_stub.ModelInfer(grpc_request(hot[shuffle.permutation(BATCH)]), timeout=30),
            "bare grpc.aio constant",
        ),
        "HTTP JSON, rows reordered": (
            lambda: http_client.post(path, json_body(hot[shuffle.permutation(BATCH)]), {}),
            lambda: bare.post(path, json_body(hot[shuffle.permutation(BATCH)]), {}),
            "bare FastAPI constant",
        ),
    }
    figures = []
    for label, (ours, theirs, baseline_name) in runs.items():
        value, baseline = interleaved(ours, theirs, s.latency_calls)
        ctx.record(series(LATENCY_MS, f"gateway hit {label}"), [v * 1000 for v in value])
        ctx.record(series(LATENCY_MS, f"bare {label}"), [v * 1000 for v in baseline])
        figures.append(
            Figure(
                name=f"gateway hit p50, {label}",
                value=_p50_ms(value),
                unit="ms",
                baseline=_p50_ms(baseline),
                baseline_name=baseline_name,
                goal="ratio <= 1.5",
                conditions={"rows": BATCH, "features": N_FEATURES, "calls": len(value)},
            )
        )
    bare.close()
    bare_channel.close()
    return figures


def _miss_latency(
    ctx: BenchContext,
    s: Sizes,
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub,
    trainer: str,
    settings: Settings,
    rng: np.random.Generator,
) -> list[Figure]:
    direct_channel = sync_channel(trainer, settings)
    direct = grpc_service_pb2_grpc.GRPCInferenceServiceStub(direct_channel)
    make = fresh_rows(rng)
    value, baseline = interleaved(
        lambda: stub.ModelInfer(make(), timeout=30),
        lambda: direct.ModelInfer(make(), timeout=30),
        s.miss_calls,
    )
    direct_channel.close()
    ctx.record(series(LATENCY_MS, "gateway miss gRPC"), [v * 1000 for v in value])
    ctx.record(series(LATENCY_MS, "trainer direct gRPC"), [v * 1000 for v in baseline])
    return [
        Figure(
            name="gateway miss p50, gRPC",
            value=_p50_ms(value),
            unit="ms",
            baseline=_p50_ms(baseline),
            baseline_name="trainer OIP directly",
            goal="ratio <= 1.3",
            conditions={"rows": BATCH, "calls": len(value), "every row new": True},
        )
    ]


def _throughput(
    name: str, value: Calls, baseline: Calls, baseline_name: str, **conditions: object
) -> Figure:
    return Figure(
        name=name,
        value=value.total / value.seconds,
        unit="req/s",
        baseline=baseline.total / baseline.seconds,
        baseline_name=baseline_name,
        conditions={"clients": CLIENTS, "rows": BATCH, **conditions},
    )


def _throughput_hits(
    ctx: BenchContext,
    s: Sizes,
    gateway: str,
    bare: str,
    settings: Settings,
    request: pb.ModelInferRequest,
) -> list[Figure]:
    ours = closed_loop(gateway, settings, lambda: request, CLIENTS, s.seconds)
    theirs = closed_loop(bare, settings, lambda: request, CLIENTS, s.seconds)
    ctx.record(series(THROUGHPUT, "gateway hits"), [ours.total / ours.seconds])
    ctx.record(series(CONCURRENCY, "gateway hits"), [CLIENTS])
    hits = ours.count("hit") / max(1, ours.total)
    return [
        _throughput(
            "throughput, 64 gRPC clients, 100% hits",
            ours,
            theirs,
            "bare grpc.aio constant",
            hit_share=round(hits, 3),
        )
    ]


def _throughput_misses(
    ctx: BenchContext,
    s: Sizes,
    gateway: str,
    trainer: str,
    settings: Settings,
    rng: np.random.Generator,
) -> list[Figure]:
    ours = closed_loop(gateway, settings, fresh_rows(rng), CLIENTS, s.seconds)
    theirs = closed_loop(trainer, settings, fresh_rows(rng), CLIENTS, s.seconds)
    ctx.record(series(THROUGHPUT, "gateway misses"), [ours.total / ours.seconds])
    ctx.record(series(CONCURRENCY, "gateway misses"), [CLIENTS])
    return [
        _throughput(
            "throughput, 64 gRPC clients, 100% misses",
            ours,
            theirs,
            "trainer OIP directly",
            errors=ours.total - ours.count("miss"),
        )
    ]


def _zipf(
    ctx: BenchContext, s: Sizes, cached: str, uncached: str, settings: Settings
) -> list[Figure]:
    rng = np.random.default_rng(9)
    universe = rng.normal(size=(s.zipf_universe, N_FEATURES)).astype(np.float32)
    weights = 1.0 / np.arange(1, s.zipf_universe + 1) ** ZIPF_S
    weights /= weights.sum()

    def mix(seed: int) -> Callable[[], pb.ModelInferRequest]:
        draw = np.random.default_rng(seed)
        return lambda: grpc_request(universe[draw.choice(s.zipf_universe, ZIPF_ROWS, p=weights)])

    ours = closed_loop(cached, settings, mix(1), CLIENTS, s.seconds)
    theirs = closed_loop(uncached, settings, mix(1), CLIENTS, s.seconds)
    answered = ours.total - sum(
        ours.count(o) for o in ours.latencies if o not in ("hit", "partial", "miss")
    )
    return [
        Figure(
            name="Zipf(0.99) mix, effective throughput",
            value=ours.total / ours.seconds,
            unit="req/s",
            baseline=theirs.total / theirs.seconds,
            baseline_name="same mix, cache disabled",
            conditions={
                "clients": CLIENTS,
                "rows per request": ZIPF_ROWS,
                "distinct rows": s.zipf_universe,
                "cold start": True,
                "hit share": round(ours.count("hit") / max(1, answered), 3),
                "partial share": round(ours.count("partial") / max(1, answered), 3),
            },
        )
    ]


def _overload(
    ctx: BenchContext, s: Sizes, gateway: str, settings: Settings, rng: np.random.Generator
) -> list[Figure]:
    admitted = ADMITTED
    unloaded = closed_loop(gateway, settings, fresh_rows(rng), admitted, s.seconds)
    loaded = closed_loop(gateway, settings, fresh_rows(rng), 4 * admitted, s.overload_seconds)
    served = [v for o, vs in loaded.latencies.items() if o != "resource_exhausted" for v in vs]
    refused = loaded.latencies.get("resource_exhausted", [])
    base = [v for vs in unloaded.latencies.values() for v in vs]
    ctx.record(series(LATENCY_MS, "overload admitted"), [v * 1000 for v in served])
    ctx.record(series(LATENCY_MS, "overload refused"), [v * 1000 for v in refused])
    conditions = {
        "admitted concurrency": admitted,
        "queue": admitted // 4,
        "clients": 4 * admitted,
        "seconds": s.overload_seconds,
        "refused client backoff s": BACKOFF_S,
    }
    return [
        Figure(
            name="overload 4x: p99 of admitted requests",
            value=percentile(served, 99) * 1000,
            unit="ms",
            baseline=percentile(base, 99) * 1000,
            baseline_name=f"p99 at {admitted} clients",
            conditions=conditions,
        ),
        Figure(
            name="overload 4x: share refused fast",
            value=100 * len(refused) / max(1, loaded.total),
            unit="%",
            conditions={
                **conditions,
                "refusal p99 ms": round(percentile(refused, 99) * 1000, 2),
                "other errors": len(served)
                - sum(
                    len(loaded.latencies.get(o, [])) for o in ("hit", "partial", "miss", "bypass")
                ),
            },
        ),
    ]


if __name__ == "__main__":
    sys.exit(run_standalone(run))
