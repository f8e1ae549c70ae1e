"""Inference at the trainer (OIP ModelInfer over gRPC), dynamic batching on vs off, in one
sitting: 64 concurrent clients each sending single-row requests back to back, to

- a `--hidden 1024,1024` model (a single-row forward costs ~0.2 ms or more on a CPU):
  throughput with the dynamic batcher vs with batching off (goal >= 3x), and the p99
  latency with batching vs its bound: max queue delay + one 64-row batch forward + the RPC
  overhead (a lone request's latency minus its forward pass, with batching off: with it
  on, a lone request also waits out the queue delay, already in the bound);
- the seed model (`--hidden 64`), the same figures, where the RPC dominates: the
  conditions say where the time goes (forward of one row, of a 64-row batch, the RPC).

Each arm is a trainer process (`--role serve`) started by `onehop.launcher.Mesh` with its
batching settings ("off" is the same server with max batch size 1); the clients are
grpc.aio coroutines on one channel in this process, sending a pre-encoded request and
taking the answer's bytes (checked once), so the client spends little CPU of its own. Each
figure also says where the CPU went: the server's and the client's CPU seconds per request.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from onehop.benchmark import BenchContext, Figure, run_standalone
from onehop.channels import aio_channel
from onehop.launcher import SERVICES, Mesh
from onehop.settings import Settings
from protos.inference import grpc_service_pb2 as pb
from trainer_service.model import ModelSpec, Preprocessing
from trainer_service.registry import Registry
from trainer_service.training import build_model

FEATURES = 30
CLIENTS = 64
MAX_BATCH = 64
QUEUE_DELAY_MS = 2.0
MODELS = {"wide": (1024, 1024), "seed": (64,)}


def register_models(data_dir: Path) -> Registry:
    registry = Registry(data_dir / "trainer" / "registry")
    pre = Preprocessing(
        tuple(f"f{i}" for i in range(FEATURES)), (0.0,) * FEATURES, (1.0,) * FEATURES
    )
    for name, hidden in MODELS.items():
        registry.register(name, build_model(ModelSpec.resolve(hidden), pre, 0), target="y")
    return registry


def forward_seconds(registry: Registry, name: str, rows: int, repeats: int = 200) -> float:
    """Median in-process time of one forward pass of `rows` rows (what the server does)."""
    model = registry.load_model(registry.record(name), torch.device("cpu"))
    x = torch.randn(rows, FEATURES)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model.predict(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def request(name: str, row: np.ndarray) -> bytes:
    """An encoded single-row ModelInfer request (raw little-endian FP32, as tritonclient)."""
    message = pb.ModelInferRequest(model_name=name)
    message.inputs.add(name="input", datatype="FP32", shape=[1, FEATURES])
    message.raw_input_contents.append(row.astype("<f4").tobytes())
    return message.SerializeToString()


async def load(
    address: str, settings: Settings, name: str, clients: int, seconds: float, server: int
) -> dict:
    """`clients` concurrent loops of single-row requests for `seconds`: the throughput,
    every latency, and the CPU seconds per request of the server (process `server`) and of
    this client."""
    rows = np.random.default_rng(0).standard_normal((clients, FEATURES), dtype=np.float32)
    messages = [request(name, row) for row in rows]
    latencies: list[float] = []
    async with aio_channel(address, settings) as channel:
        # Bytes in, bytes out: the client neither encodes nor decodes per call.
        infer = channel.unary_unary(MODEL_INFER)
        for message in messages:  # warm the connection and the model; check the answers
            reply = pb.ModelInferResponse.FromString(await infer(message, timeout=30))
            assert reply.model_name == name and len(reply.raw_output_contents) == 1
        stop = time.perf_counter() + seconds

        async def client(message: bytes) -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                await infer(message, timeout=30)
                latencies.append(time.perf_counter() - start)

        process = psutil.Process(server)
        server_cpu, client_cpu = sum(process.cpu_times()[:2]), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(client(message) for message in messages))
        elapsed = time.perf_counter() - started
        server_cpu = sum(process.cpu_times()[:2]) - server_cpu
        client_cpu = time.process_time() - client_cpu
    return {
        "throughput": len(latencies) / elapsed,
        "latencies": latencies,
        "server_cpu_per_request": server_cpu / len(latencies),
        "client_cpu_per_request": client_cpu / len(latencies),
    }


def serve(ctx: BenchContext, max_batch: int) -> tuple[Mesh, Settings, str, int]:
    data_dir = ctx.workdir / "serve"
    settings = Settings(data_dir=data_dir, log_level="WARNING")
    env = {
        "ONEHOP_TRAINER_ROLE": "serve",
        "ONEHOP_TRAINER_MAX_BATCH_SIZE": str(max_batch),
        "ONEHOP_TRAINER_MAX_QUEUE_DELAY_MS": str(QUEUE_DELAY_MS),
    }
    services = tuple(s for s in SERVICES if s.name == "trainer")
    mesh = Mesh(settings, say=lambda _line: None, services=services, env=env)
    endpoints = mesh.start()
    return mesh, settings, endpoints["trainer"]["grpc"], mesh.children["trainer"].process.pid


def p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99))


def run(ctx: BenchContext) -> list[Figure]:
    """Serving: dynamic batching vs off, 64 concurrent single-row clients, two models."""
    seconds, lone_seconds, repeats = (0.8, 0.3, 100) if ctx.quick else (10.0, 2.0, 500)
    registry = register_models(ctx.workdir / "serve")
    forward = {
        name: {rows: forward_seconds(registry, name, rows, repeats) for rows in (1, MAX_BATCH)}
        for name in MODELS
    }
    results: dict[str, dict[str, Any]] = {}
    for label, max_batch in (("on", MAX_BATCH), ("off", 1)):
        mesh, settings, address, pid = serve(ctx, max_batch)
        try:
            for name in MODELS:
                results[f"{name}.{label}"] = asyncio.run(
                    load(address, settings, name, CLIENTS, seconds, pid)
                )
                if label == "off":
                    lone = asyncio.run(load(address, settings, name, 1, lone_seconds, pid))
                    results[f"{name}.{label}"]["lone_p50"] = statistics.median(lone["latencies"])
        finally:
            mesh.stop()
    figures = []
    for name, hidden in MODELS.items():
        on, off = results[f"{name}.on"], results[f"{name}.off"]
        ctx.record(f"serving.latency_ms.{name}.batching", [v * 1e3 for v in on["latencies"]])
        ctx.record(f"serving.latency_ms.{name}.no_batching", [v * 1e3 for v in off["latencies"]])
        rpc = max(off["lone_p50"] - forward[name][1], 0.0)
        bound = QUEUE_DELAY_MS / 1e3 + forward[name][MAX_BATCH] + rpc
        where = {
            "hidden": list(hidden),
            "clients": CLIENTS,
            "max_batch_size": MAX_BATCH,
            "max_queue_delay_ms": QUEUE_DELAY_MS,
            "forward_1_row_ms": forward[name][1] * 1e3,
            f"forward_{MAX_BATCH}_rows_ms": forward[name][MAX_BATCH] * 1e3,
            # What batching can win at most: the forward's cost per row, alone vs batched.
            "in_process_batching_gain": forward[name][1] * MAX_BATCH / forward[name][MAX_BATCH],
            "rpc_overhead_ms": rpc * 1e3,
            "server_cpu_us_per_request_batching": on["server_cpu_per_request"] * 1e6,
            "server_cpu_us_per_request_no_batching": off["server_cpu_per_request"] * 1e6,
            "client_cpu_us_per_request": on["client_cpu_per_request"] * 1e6,
            "p50_ms_batching": statistics.median(on["latencies"]) * 1e3,
            "p99_ms_no_batching": p99(off["latencies"]) * 1e3,
        }
        figures += [
            Figure(
                f"inference throughput, {CLIENTS} concurrent single-row clients, {name} model",
                on["throughput"],
                "requests/s",
                off["throughput"],
                "the same server with batching off",
                "ratio >= 3" if name == "wide" else "",
                where,
            ),
            Figure(
                f"inference p99 with dynamic batching, {name} model",
                p99(on["latencies"]) * 1e3,
                "ms",
                bound * 1e3,
                "max queue delay + one batch forward + RPC overhead",
                "ratio <= 1",
                where,
            ),
        ]
    return figures


if __name__ == "__main__":
    raise SystemExit(run_standalone(run))
