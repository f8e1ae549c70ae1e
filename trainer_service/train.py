"""`python -m trainer_service.train ...`: one training job in this process, alone or as one
rank of `torchrun --nproc-per-node N -m trainer_service.train ...` (DDP: gloo on CPU, NCCL
on GPU; every rank trains its share of each epoch's shards).

Data comes from the mesh (`--dataset NAME`, through the cache-first data plane at
ONEHOP_SHARD_ADDRESS / ONEHOP_CACHE_*), or from a local CSV / Parquet / Arrow file
(`--data PATH`, split into `--shards` shards and standardised like the data plane does).
Rank 0 writes checkpoints (`--checkpoint-every N` steps and after every epoch) and registers
the model once; `--resume` continues from the last checkpoint at the same step and data
position. Prints one line per epoch and, last, one JSON line with the outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from onehop.client import read_batches
from onehop.dataplane import DataClient
from onehop.errors import OnehopError
from onehop.settings import Settings
from onehop.training_view import parse_hidden
from trainer_service.checkpoint import CHECKPOINT
from trainer_service.jobs import FlightData, JobPlan, JobRequest, make_plan
from trainer_service.model import configure_threads, describe_device, select_device
from trainer_service.registry import Registry
from trainer_service.sources import DataAccess, TableData
from trainer_service.training import (
    Checkpointing,
    Distributed,
    Progress,
    TrainingFailed,
    build_model,
    train,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer_service.train", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a dataset of the mesh")
    source.add_argument("--data", type=Path, help="a local CSV, Parquet or Arrow file")
    parser.add_argument("--dataset-version", type=int, default=0)
    parser.add_argument("--shards", type=int, default=8, help="shards of a --data file")
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", required=True, help="name to register the model under")
    parser.add_argument("--features", default="", help="comma-separated; default: all numeric")
    parser.add_argument("--task", default="", help="binary (default), multiclass, regression")
    parser.add_argument("--hidden", default="64", help="hidden widths, e.g. 64 or 64,32")
    parser.add_argument("--activation", default="")
    parser.add_argument("--dropout", type=float, default=0.0, help="0 = 0.5; negative = none")
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--optimizer", default="", help="adam, adamw, sgd or lamb")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--lr-schedule", default="", help="constant, cosine or linear")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--early-stopping", type=int, default=0, help="patience in epochs")
    parser.add_argument("--val-split", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps; 0 = per epoch")
    parser.add_argument("--checkpoint-dir", type=Path, help="default: beside the registry")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--registry", type=Path, help="default: the trainer's, in data_dir")
    parser.add_argument("--no-promote", action="store_true", help="register without serving")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0 = OMP_NUM_THREADS or cores - 1"
    )
    return parser.parse_args(argv)


def job_request(args: argparse.Namespace, dataset: str) -> JobRequest:
    return JobRequest(
        dataset=dataset,
        dataset_version=args.dataset_version,
        target=args.target,
        model_name=args.model,
        features=tuple(f for f in args.features.split(",") if f),
        hidden=tuple(parse_hidden(args.hidden)),
        dropout=args.dropout,
        activation=args.activation,
        task=args.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_split=args.val_split,
        seed=args.seed,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        early_stopping_patience=args.early_stopping,
        checkpoint_every_steps=args.checkpoint_every,
    )


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[tuple[Distributed, torch.device]]:
    """This process's rank and device: torchrun's environment when WORLD_SIZE > 1 (NCCL on
    CUDA, gloo on CPU), else alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_name)
    if world <= 1:
        yield Distributed(), device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Distributed(torch_dist.get_rank(), torch_dist.get_world_size()), device
    finally:
        torch_dist.destroy_process_group()


def data_access(args: argparse.Namespace, settings: Settings) -> tuple[DataAccess, str]:
    if args.data is not None:
        name = args.data.stem
        return TableData(name, read_batches(args.data).read_all(), args.shards), name
    return FlightData(functools.partial(DataClient, settings)), args.dataset


def print_progress(rank: int, progress: Progress) -> None:
    """One line per finished epoch, on rank 0."""
    if rank or not progress.history or progress.history[-1]["epoch"] != progress.epoch:
        return
    metrics = " ".join(f"val_{k}={v:.4f}" for k, v in sorted(progress.metrics.items()))
    print(
        f"epoch {progress.epoch}/{progress.epochs} step {progress.step}/{progress.total_steps} "
        f"loss={progress.loss:.4f} {metrics} samples/s={progress.samples_per_second:,.0f} "
        f"data_wait={progress.data_wait_share:.1%}",
        flush=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    configure_threads(args.threads)
    registry_root = args.registry or settings.service_dir("trainer") / "registry"
    data, dataset = data_access(args, settings)
    plan: JobPlan = make_plan(job_request(args, dataset), data)
    checkpoint_dir = args.checkpoint_dir or registry_root.parent / "checkpoints" / args.model
    with process_group(args.device) as (dist, device):
        with data.open(plan.dataset, plan.columns, plan.request.target) as shards:
            model = build_model(plan.spec, plan.preprocessing, plan.hp.seed)
            result = train(
                model,
                shards,
                plan.request.target,
                plan.hp,
                device=device,
                on_progress=functools.partial(print_progress, dist.rank),
                progress_interval=float("inf"),
                checkpointing=Checkpointing(
                    checkpoint_dir / CHECKPOINT, plan.identity(), resume=args.resume
                ),
                dist=dist,
            )
        version = 0
        if dist.rank == 0:
            record = Registry(registry_root).register(
                args.model,
                model,
                target=plan.request.target,
                dataset=plan.dataset.name,
                dataset_version=plan.dataset.version,
                metrics=result.metrics,
                promote=not args.no_promote,
            )
            version = record.version
        if dist.active:
            torch_dist.barrier()
    return {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "device": describe_device(device),
        "steps": result.steps,
        "loss": result.loss,
        "metrics": result.metrics,
        "samples_per_second": result.samples_per_second,
        "data_wait_share": result.data_wait_share,
        "bytes_read": result.bytes_read,
        "stopped_early": result.stopped_early,
        "model_version": version,
        "history_losses": [entry["loss"] for entry in result.history],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        outcome = run(args)
    except (OnehopError, TrainingFailed) as exc:
        message = exc.message if isinstance(exc, OnehopError) else str(exc)
        print(json.dumps({"error": message}), flush=True)
        print(f"error: {message}", file=sys.stderr)
        return 1
    if outcome["rank"] == 0:
        print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
