"""`onehop demo`: the main job end to end — ingest a credit-default table, train the seed
model through the mesh, predict a batch twice through the HTTP bridge, and print what each
step cost next to a plain in-process baseline."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from onehop.client import GatewayClient, read_batches
from onehop.dataplane import flight_client
from onehop.dataset import TARGET, credit_default, write_csv
from onehop.launcher import Mesh
from onehop.settings import Settings
from onehop.training_view import follow_job, job_request
from protos.onehop.v1 import data_pb2

DATASET = "credit-default"
MODEL = "default-risk"
PREDICT_ROWS = 1000
PREDICT_BATCHES = 5


@dataclass
class ReadPass:
    seconds: float
    bytes: int
    rows: int
    from_cache: int
    endpoints: int


def read_plan(
    info: flight.FlightInfo, cache_flight: set[str], settings: Settings | None = None
) -> ReadPass:
    """Redeem every endpoint at its first location, as any Flight client would (with the
    TLS and token of `settings`; None: the environment's)."""
    settings = settings or Settings()
    clients: dict[str, flight.FlightClient] = {}
    start = time.perf_counter()
    rows = size = from_cache = 0
    for endpoint in info.endpoints:
        location = endpoint.locations[0].uri.decode()
        client = clients.get(location) or clients.setdefault(
            location, flight_client(location, settings)
        )
        table = client.do_get(endpoint.ticket).read_all()
        rows += table.num_rows
        size += table.nbytes
        from_cache += location in cache_flight
    seconds = time.perf_counter() - start
    for client in clients.values():
        client.close()
    return ReadPass(seconds, size, rows, from_cache, len(info.endpoints))


def _wait_cached(client: GatewayClient, request: data_pb2.DataRequest, timeout: float = 15.0):
    """Re-plan until every endpoint lists the cache first (write-through is asynchronous)."""
    deadline = time.monotonic() + timeout
    info = client.plan(request)
    while time.monotonic() < deadline:
        if info.endpoints and all(len(ep.locations) > 1 for ep in info.endpoints):
            return info
        time.sleep(0.2)
        info = client.plan(request)
    return info


def baseline_training(table: pa.Table, features: list[str], epochs: int, batch: int) -> float:
    """Plain in-process torch on in-memory tensors — the seed model, the same epochs, batch
    size and training rows — as a user would write it. Returns training samples/s."""
    import torch

    from trainer_service.model import ModelSpec, build_mlp

    x = np.column_stack([table[f].to_numpy().astype(np.float32) for f in features])
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    y = table[TARGET].to_numpy().astype(np.float32)
    n_train = int(len(x) * 0.8)
    xt, yt = torch.from_numpy(x[:n_train]), torch.from_numpy(y[:n_train])
    torch.manual_seed(0)
    model = build_mlp(len(features), ModelSpec.resolve())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([0, epoch]).permutation(n_train))
        for i in range(0, n_train, batch):
            idx = order[i : i + batch]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]).squeeze(1), yt[idx])
            loss.backward()
            optimiser.step()
    return epochs * n_train / (time.perf_counter() - start)


def measure_predictions(client: GatewayClient, batches: list[np.ndarray]) -> dict[str, list]:
    """Each batch once (cold: the miss path), then — once its write-back has landed — again
    (the hit path). Write-backs happen after the response, so the second pass waits for a
    batch's first hit, bounded, and counts every call it made."""
    calls: dict[str, list] = {"miss": [], "hit": [], "other": []}
    first = [client.predict(MODEL, batch) for batch in batches]
    for result in first:
        calls[result.cache if result.cache == "miss" else "other"].append(result)
    for batch, cold in zip(batches, first, strict=True):
        for _ in range(50):
            warm = client.predict(MODEL, batch)
            if warm.cache == "hit":
                if not np.array_equal(warm.outputs["probability"], cold.outputs["probability"]):
                    raise AssertionError("a cached prediction differs from the computed one")
                calls["hit"].append(warm)
                break
            calls["other"].append(warm)
            time.sleep(0.02)
    return calls


def run_demo(settings: Settings, rows: int = 120_000, epochs: int = 3) -> int:
    mesh = None
    if Mesh(settings).running_gateway() is None:
        print(f"no mesh running in {settings.data_dir}: starting one for the demo")
        mesh = Mesh(settings)
        mesh.start()
    try:
        return _demo(settings, rows, epochs)
    finally:
        if mesh is not None:
            mesh.stop()


def _demo(settings: Settings, rows: int, epochs: int) -> int:
    csv_path = settings.data_dir / "demo" / f"credit_default_{rows}.csv"
    table = credit_default(rows)
    if not csv_path.exists():
        write_csv(table, csv_path)
    features = [c for c in table.column_names if c != TARGET]
    batch = 32

    with GatewayClient(settings, timeout=120) as client:
        cache_flight = _cache_flight_locations(settings)

        start = time.perf_counter()
        info = client.ingest(read_batches(csv_path), DATASET)
        ingest_s = time.perf_counter() - start
        print(f"ingested {info.rows:,} rows into {len(info.shards)} shards, version {info.version}")

        job_id = client.start_job(
            job_request(
                dataset=DATASET, target=TARGET, model=MODEL, epochs=epochs, batch_size=batch
            )
        )
        outcome = follow_job(client, job_id)
        if outcome.state_name != "SUCCEEDED":
            print(f"training failed: {outcome.status.message}")
            return 1
        job = outcome.status
        baseline_sps = baseline_training(table, features, epochs, batch)

        # Data plane: the standardised table, first from the origin, then from the cache.
        request = data_pb2.DataRequest(
            dataset=DATASET,
            version=info.version,
            preprocess=data_pb2.Preprocessing(
                scaling=data_pb2.SCALING_STANDARD, passthrough=[TARGET]
            ),
        )
        origin = read_plan(client.plan(request), cache_flight, settings)
        cached = read_plan(_wait_cached(client, request), cache_flight, settings)

        # Predict plane: held-out batches twice through the HTTP bridge.
        held_out = np.column_stack(
            [table[f].to_numpy()[-PREDICT_BATCHES * PREDICT_ROWS :] for f in features]
        ).astype(np.float32)
        calls = measure_predictions(client, np.split(held_out, PREDICT_BATCHES))

    miss, hit = calls["miss"], calls["hit"]
    total_calls = len(miss) + len(hit) + len(calls["other"])
    print()
    print(
        f"onehop demo report — {DATASET}: {info.rows:,} rows × {len(features)} features, "
        f"{len(info.shards)} shards; {platform.machine()}, {_cpus()} CPUs"
    )
    lines = [
        (
            "ingest (CSV → shards, stats)",
            f"{ingest_s:.2f} s",
            f"{info.rows / ingest_s:,.0f} rows/s",
        ),
        (
            f"training, mesh ({epochs} epochs, batch {batch})",
            f"{job.elapsed_seconds:.2f} s",
            f"{job.samples_per_second:,.0f} samples/s, data wait {job.data_wait_share:.1%}, "
            f"val AUC {job.metrics.get('auc', float('nan')):.3f}",
        ),
        (
            "training, baseline (in-process tensors)",
            f"{baseline_sps:,.0f}",
            f"samples/s; mesh/baseline {job.samples_per_second / baseline_sps:.2f}",
        ),
        (
            f"inference, miss path ({PREDICT_ROWS} rows, HTTP)",
            f"{_p50(miss) * 1000:.1f} ms",
            f"p50 of {len(miss)} calls, hops {_hops(miss)}",
        ),
        (
            f"inference, hit path ({PREDICT_ROWS} rows, HTTP)",
            f"{_p50(hit) * 1000:.1f} ms",
            f"p50 of {len(hit)} calls, hops {_hops(hit)}, "
            f"{_p50(miss) / _p50(hit):.1f}× faster, outputs identical",
        ),
        (
            "cache hit rate, predictions",
            f"{len(hit) / total_calls:.0%}",
            f"{len(hit)} of {total_calls} calls answered wholly from the cache",
        ),
        (
            "cache hit rate, data (second read)",
            f"{cached.from_cache / cached.endpoints:.0%}",
            f"{cached.from_cache} of {cached.endpoints} shards served by the cache",
        ),
        (
            "data access, origin (shard service)",
            f"{origin.seconds * 1000:.0f} ms",
            f"{origin.rows:,} rows, {origin.bytes / 1e6:.1f} MB, 1 hop per shard",
        ),
        (
            "data access, cache",
            f"{cached.seconds * 1000:.0f} ms",
            f"{cached.rows:,} rows, {cached.bytes / 1e6:.1f} MB, 1 hop per shard, "
            f"{origin.seconds / cached.seconds:.1f}× faster",
        ),
    ]
    width = max(len(name) for name, _, _ in lines)
    for name, value, note in lines:
        print(f"  {name:<{width}}  {value:>10}  {note}")
    return 0 if len(hit) == PREDICT_BATCHES else 1


def _p50(results: list) -> float:
    return float(np.median([r.seconds for r in results])) if results else float("nan")


def _hops(results: list) -> str:
    return "/".join(str(h) for h in sorted({r.hops for r in results}))


def _cache_flight_locations(settings: Settings) -> set[str]:
    from onehop.channels import flight_location
    from onehop.launcher import read_run_file

    info = read_run_file(settings.data_dir, "cache")
    return {flight_location(info["endpoints"]["flight"], settings)} if info else set()


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
