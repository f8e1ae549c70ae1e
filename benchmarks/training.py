"""Training against what a user would otherwise run, in one sitting:

- samples/s of the trainer's loop fed through the mesh (cache and shard service as
  processes; shards planned cache-first, read over Flight, prefetched) vs the same model,
  batch size, epochs and rows as in-memory torch tensors in one process (a shuffled
  gather per batch and the same validation pass per epoch): warm (every prepared shard
  cached) and cold (a fresh dataset version: the shard service prepares every shard, the
  first epoch's reads are origin reads), at batch 256 and 4096;
- validation ROC AUC of the seed model vs scikit-learn's LogisticRegression on the same
  rows and split (the credit-default table of `onehop.dataset`);
- wall time lost to a crash: a job stopped dead at a random point, resumed from its last
  checkpoint, against the checkpoint interval.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import torch

from onehop.benchmark import BenchContext, Figure, run_standalone
from onehop.channels import flight_location
from onehop.dataplane import DataClient, put_dataset
from onehop.dataset import TARGET, credit_default
from onehop.launcher import SERVICES, Mesh
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2
from trainer_service.jobs import FlightData, JobPlan, JobRequest, make_plan
from trainer_service.model import ModelSpec, build_mlp, configure_threads, roc_auc
from trainer_service.sources import DataAccess, TableData
from trainer_service.training import (
    Checkpointing,
    TrainingCancelled,
    TrainResult,
    build_model,
    train,
    train_rows,
)

FEATURES = 30
SHARDS = 8
BATCHES = (256, 4096)
REPEATS = 2


def wide_table(rows: int, seed: int = 0) -> pa.Table:
    """`rows` x 30 float32 features of different spreads and a binary target from a noisy
    linear rule over them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    weights = rng.standard_normal(FEATURES).astype(np.float32)
    y = (x @ weights + rng.standard_normal(rows, dtype=np.float32) > 0).astype(np.int8)
    x *= np.arange(1, FEATURES + 1, dtype=np.float32)
    columns: dict[str, Any] = {f"f{k:02d}": x[:, k] for k in range(FEATURES)}
    columns["label"] = y
    return pa.table(columns)


def run_job(data: DataAccess, plan: JobPlan, **kwargs: Any) -> tuple[TrainResult, Any]:
    """The trainer's loop as a job runs it: the plan's shards, a fresh seed model."""
    with data.open(plan.dataset, plan.columns, plan.request.target) as shards:
        model = build_model(plan.spec, plan.preprocessing, plan.hp.seed)
        return train(model, shards, plan.request.target, plan.hp, **kwargs), model


def split_rows(
    data: DataAccess, plan: JobPlan
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The plan's standardised rows as (x_train, y_train, x_val, y_val), each shard split
    as the loop splits it."""
    with data.open(plan.dataset, plan.columns, plan.request.target) as shards:
        tables = [s.read() for s in shards]
    features = list(plan.preprocessing.features)
    parts: dict[str, list[np.ndarray]] = {"xt": [], "yt": [], "xv": [], "yv": []}
    for t in tables:
        c = train_rows(t.num_rows, plan.hp.val_split)
        x = np.column_stack([t.column(f).to_numpy() for f in features])
        y = t.column(plan.request.target).to_numpy()
        parts["xt"].append(x[:c])
        parts["yt"].append(y[:c])
        parts["xv"].append(x[c:])
        parts["yv"].append(y[c:])
    xt, yt, xv, yv = (np.concatenate(parts[k]) for k in ("xt", "yt", "xv", "yv"))
    return xt, yt, xv, yv


def in_memory(plan: JobPlan, shards_data: TableData) -> float:
    """Plain torch on in-memory tensors, written for speed: the same standardised rows,
    split and model, the rows shuffled once per epoch (one gather) and sliced into batches,
    Adam, and the same validation metrics once per epoch. Returns training samples/s."""
    xt, yt, xv, y_val = split_rows(shards_data, plan)
    x, y, x_val = torch.from_numpy(xt), torch.from_numpy(yt).float(), torch.from_numpy(xv)
    torch.manual_seed(0)
    net = build_mlp(len(plan.preprocessing.features), ModelSpec.resolve())
    optimiser = torch.optim.Adam(net.parameters(), lr=plan.hp.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batch = plan.hp.batch_size
    start = time.perf_counter()
    for _ in range(plan.hp.epochs):
        net.train()
        order = torch.randperm(len(y))
        xs, ys = x[order], y[order]
        for i in range(0, len(y), batch):
            loss = loss_fn(net(xs[i : i + batch]).squeeze(1), ys[i : i + batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        net.eval()
        with torch.inference_mode():  # the loop's validation: loss, accuracy, AUC
            logits = net(x_val).squeeze(1)
            loss_fn(logits, torch.from_numpy(y_val))
            scores = logits.numpy()
            float(((scores >= 0) == (y_val >= 0.5)).mean())
            roc_auc(y_val, scores)
    return plan.hp.epochs * len(y) / (time.perf_counter() - start)


def _cached_everywhere(client: DataClient, request: data_pb2.DataRequest, timeout: float) -> None:
    """Wait (bounded) until the plan puts the cache first for every shard."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.plan(request)
        if all(len(e.locations) > 1 for e in info.endpoints):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the write-through did not fill the cache in time")
        time.sleep(0.2)


def throughput(ctx: BenchContext, rows: int, epochs: int) -> list[Figure]:
    settings = Settings(
        data_dir=ctx.workdir / "mesh",
        default_shards=SHARDS,
        cache_size_bytes=max(1 << 30, rows * (FEATURES + 1) * 4 * 6),
        log_level="WARNING",
    )
    services = tuple(s for s in SERVICES if s.name in ("cache", "shard"))
    mesh = Mesh(settings, say=lambda _line: None, services=services)
    endpoints = mesh.start()
    settings = settings.model_copy(
        update={
            "shard_address": endpoints["shard"]["flight"],
            "cache_address": endpoints["cache"]["grpc"],
            "cache_flight_address": endpoints["cache"]["flight"],
        }
    )
    table = wide_table(rows)
    memory = TableData("bench-train", table, SHARDS)
    mesh_data = FlightData(functools.partial(DataClient, settings))
    figures = []
    try:
        with flight.connect(flight_location(settings.shard_address)) as shard:
            for batch in BATCHES:
                # A fresh version per batch size: its first epoch is cold.
                put_dataset(shard, "bench-train", table)
                request = JobRequest(
                    dataset="bench-train",
                    target="label",
                    model_name="bench",
                    epochs=epochs,
                    batch_size=batch,
                )
                plan = make_plan(request, mesh_data)
                cold_plan = make_plan(JobRequest(**{**request.__dict__, "epochs": 1}), mesh_data)
                cold, _ = run_job(mesh_data, cold_plan)
                with DataClient(settings) as client:
                    prepared = data_pb2.DataRequest(
                        dataset=plan.dataset.name,
                        version=plan.dataset.version,
                        preprocess=data_pb2.Preprocessing(
                            scaling=data_pb2.SCALING_STANDARD, passthrough=["label"]
                        ),
                        columns=plan.columns,
                        shuffle=False,
                    )
                    _cached_everywhere(client, prepared, timeout=120)
                # Best of REPEATS for both sides, interleaved, so a noisy moment on a shared
                # machine does not decide the ratio; the baseline last, so torch's one-time
                # initialisation is not charged to it.
                warm_runs, baselines = [], []
                for _ in range(REPEATS):
                    warm_runs.append(run_job(mesh_data, plan)[0])
                    baselines.append(in_memory(make_plan(request, memory), memory))
                warm = max(warm_runs, key=lambda r: r.samples_per_second)
                baseline = max(baselines)
                conditions = {
                    "rows": rows,
                    "features": FEATURES,
                    "batch": batch,
                    "shards": SHARDS,
                    "torch_threads": torch.get_num_threads(),
                }
                figures += [
                    Figure(
                        f"training samples/s through the mesh, warm cache, batch {batch}",
                        warm.samples_per_second,
                        "samples/s",
                        baseline,
                        "in-memory torch tensors, one process",
                        "ratio >= 0.9",
                        {**conditions, "epochs": epochs, "data_wait": warm.data_wait_share},
                    ),
                    Figure(
                        f"training samples/s through the mesh, cold (first epoch), batch {batch}",
                        cold.samples_per_second,
                        "samples/s",
                        baseline,
                        "in-memory torch tensors, one process",
                        "ratio >= 0.7",
                        {**conditions, "epochs": 1, "data_wait": cold.data_wait_share},
                    ),
                ]
                ctx.record(
                    f"training.epoch_wait_share.batch{batch}",
                    [h["data_wait_share"] for h in warm.history],
                )
    finally:
        mesh.stop()
    return figures


def quality(ctx: BenchContext, rows: int, epochs: int) -> Figure:
    """Seed model vs scikit-learn's logistic regression: same standardised rows and split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    data = TableData("credit", credit_default(rows), SHARDS)
    plan = make_plan(
        JobRequest(dataset="credit", target=TARGET, model_name="q", epochs=epochs, batch_size=256),
        data,
    )
    result, _ = run_job(data, plan)
    xt, yt, xv, yv = split_rows(data, plan)
    logistic = LogisticRegression(max_iter=1000).fit(xt, yt)
    reference = float(roc_auc_score(yv, logistic.predict_proba(xv)[:, 1]))
    ours = result.metrics["auc"]
    return Figure(
        "validation ROC AUC: gap of the seed model to logistic regression",
        reference - ours,
        "AUC",
        None,
        "scikit-learn LogisticRegression, same rows and split",
        "value <= 0.01",
        {"rows": rows, "epochs": epochs, "auc": ours, "logistic_regression_auc": reference},
    )


def resume(ctx: BenchContext, rows: int) -> Figure:
    """A job stopped dead at a random point, then resumed from its last checkpoint: the
    wall time it lost (stopped + resumed − the same job uninterrupted, checkpoints
    included) vs one checkpoint interval."""
    data = TableData("resume", wide_table(rows, seed=1), SHARDS)
    request = JobRequest(dataset="resume", target="label", model_name="r", epochs=2, batch_size=256)
    plan = make_plan(request, data)
    steps = plan.hp.epochs * sum(
        -(-train_rows(n, plan.hp.val_split) // plan.hp.batch_size)
        for n in plan.dataset.shard_rows.values()
    )
    every = max(steps // 4, 1)
    plan = make_plan(JobRequest(**{**request.__dict__, "checkpoint_every_steps": every}), data)
    path = ctx.workdir / "resume" / "checkpoint.safetensors"
    started = time.perf_counter()
    whole, _ = run_job(data, plan, checkpointing=Checkpointing(path, plan.identity()))
    whole_wall = time.perf_counter() - started
    path.unlink()
    interval = whole.elapsed * every / whole.steps
    crash_after = random.Random(0).uniform(0.3, 0.8) * whole.elapsed
    stop = threading.Event()
    timer = threading.Timer(crash_after, stop.set)
    started = time.perf_counter()
    timer.start()
    try:
        run_job(
            data, plan, should_stop=stop.is_set, checkpointing=Checkpointing(path, plan.identity())
        )
    except TrainingCancelled:
        pass
    stopped = time.perf_counter() - started
    started = time.perf_counter()
    resumed, _ = run_job(
        data, plan, checkpointing=Checkpointing(path, plan.identity(), resume=True)
    )
    lost = stopped + (time.perf_counter() - started) - whole_wall
    return Figure(
        "wall time lost to a crash, resumed from the last checkpoint",
        lost,
        "s",
        interval,
        "one checkpoint interval",
        "ratio <= 1",
        {
            "rows": rows,
            "checkpoint_every_steps": every,
            "steps": whole.steps,
            "resumed_steps": resumed.steps,
            "crash_after_s": crash_after,
        },
    )


def run(ctx: BenchContext) -> list[Figure]:
    """Training: mesh-fed loop vs in-memory tensors, AUC vs logistic regression, resume."""
    # The trainer's thread policy, for its loop and the in-memory baseline alike.
    configure_threads()
    if ctx.quick:
        figures = throughput(ctx, rows=100_000, epochs=1)
        figures.append(quality(ctx, rows=20_000, epochs=5))
        figures.append(resume(ctx, rows=40_000))
        return figures
    figures = throughput(ctx, rows=1_000_000, epochs=2)
    figures.append(quality(ctx, rows=200_000, epochs=10))
    figures.append(resume(ctx, rows=500_000))
    return figures


if __name__ == "__main__":
    raise SystemExit(run_standalone(run))
