"""`onehop` — the command line: start the mesh, ingest, train, predict, run the demo."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from onehop import __version__
from onehop.errors import InvalidArgument, OnehopError, Unavailable
from onehop.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    return Settings(**overrides)


def cmd_up(args: argparse.Namespace) -> int:
    from onehop.launcher import Mesh

    settings = _settings(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh = Mesh(settings)
    print(f"starting onehop {__version__} in {settings.data_dir}", flush=True)
    mesh.start()
    endpoints = mesh.children["gateway"].endpoints
    print(
        f"ready  http=http://{endpoints['http']} grpc={endpoints['grpc']} "
        f"flight=grpc+tcp://{endpoints['flight']}",
        flush=True,
    )
    try:
        mesh.supervise(stop.is_set)
    finally:
        print("stopping", flush=True)
        mesh.stop()
    print("stopped", flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from onehop.launcher import status

    settings = _settings(args)
    rows = status(settings.data_dir, settings)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            shown = " ".join(f"{k}={v}" for k, v in sorted(row["endpoints"].items()))
            print(f"{row['name']:<8} {row['health']:<12} pid={row['pid']} {shown}")
    return 0 if all(row["health"] == "SERVING" for row in rows) else 3


def cmd_ingest(args: argparse.Namespace) -> int:
    """A local file streams through the gateway (DoPut); a URI (s3://, gs://, file://) is
    read by the shard service itself, under its source rules."""
    from onehop.channels import flight_location
    from onehop.client import gateway_endpoints
    from onehop.dataplane import flight_client, put_file, run_action
    from protos.onehop.v1 import data_pb2

    request = data_pb2.IngestRequest(
        dataset=args.name,
        shards=args.shards,
        key=args.key or "",
        partitioning=data_pb2.Partitioning.Value(
            "PARTITION_" + (args.partition or "default").upper().replace("-", "_")
        ),
        bounds=[float(b) for b in args.bounds.split(",")] if args.bounds else [],
        target=args.target or "",
        positive_class=args.positive_class or "",
        source=args.path if "://" in args.path else "",
        format=args.format or "",
    )
    settings = _settings(args)
    address = flight_location(gateway_endpoints(settings)["flight"], settings)
    with flight_client(address, settings) as client:
        if request.source:
            body = run_action(client, "ingest", request.SerializeToString())
            info = data_pb2.DatasetInfo.FromString(body)
        else:
            info = put_file(client, Path(args.path), request)
    print(
        f"ingested {info.name} version {info.version}: {info.rows} rows in {len(info.shards)} shards"
    )
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from onehop.client import GatewayClient

    with GatewayClient(_settings(args)) as client:
        for info in client.datasets():
            print(
                f"{info.name:<24} v{info.version:<4} {info.rows:>10} rows {len(info.shards):>4} shards"
            )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from onehop.client import GatewayClient

    with GatewayClient(_settings(args)) as client:
        for model in client.models():
            metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(model.metrics.items()))
            print(f"{model.name:<24} v{model.version:<4} {model.weights_digest[:12]} {metrics}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from onehop.client import GatewayClient
    from onehop.training_view import follow_job, job_request

    request = job_request(
        dataset=args.dataset,
        target=args.target,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        hidden=args.hidden,
        dropout=args.dropout,
        lr=args.lr,
        val_split=args.val_split,
        seed=args.seed,
        task=args.task,
        activation=args.activation,
        optimizer=args.optimizer,
        lr_schedule=args.lr_schedule,
        early_stopping=args.early_stopping,
        checkpoint_every=args.checkpoint_every,
    )
    with GatewayClient(_settings(args)) as client:
        job_id = client.start_job(request)
        print(f"job {job_id} started")
        if args.detach:
            return 0
        final = follow_job(client, job_id)
    return 0 if final.state_name == "SUCCEEDED" else 1


def _rows_from_args(args: argparse.Namespace, features: list[str]) -> np.ndarray:
    if args.json:
        data = json.loads(args.json)
        if data and isinstance(data[0], dict):
            missing = [f for f in features if f not in data[0]]
            if missing:
                raise InvalidArgument(f"rows lack feature(s) {missing}; the model needs {features}")
            data = [[row[f] for f in features] for row in data]
        return np.asarray(data, dtype=np.float32)
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(args.csv)
    missing = [f for f in features if f not in table.column_names]
    if missing:
        raise InvalidArgument(f"{args.csv} lacks column(s) {missing}; the model needs {features}")
    return np.column_stack([table[f].to_numpy().astype(np.float32) for f in features])


def cmd_predict(args: argparse.Namespace) -> int:
    from onehop.client import GatewayClient

    with GatewayClient(_settings(args)) as client:
        features = list(client.model(args.model).features)
        rows = _rows_from_args(args, features)
        result = client.predict(args.model, rows)
    for name, values in result.outputs.items():
        for row in values:
            print(f"{name}={' '.join(f'{v:.6f}' for v in row)}")
    print(
        f"model {args.model} v{result.model_version}: {len(rows)} rows, cache={result.cache}, "
        f"hops={result.hops}, {result.seconds * 1000:.1f} ms",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from onehop.demo import run_demo

    return run_demo(_settings(args), rows=args.rows, epochs=args.epochs)


def cmd_bench(args: argparse.Namespace) -> int:
    from onehop.bench import command

    return command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onehop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"onehop {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", help="state directory (default ./.onehop or $ONEHOP_DATA_DIR)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", parents=[common], help="start the mesh in the foreground").set_defaults(
        func=cmd_up
    )
    p = sub.add_parser("status", parents=[common], help="each service: pid, endpoints, health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "ingest", parents=[common], help="CSV / Parquet / Arrow file → new dataset version"
    )
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--shards", type=int, default=0, help="number of shards (default: the service's)"
    )
    p.add_argument("--key", help="place rows by hash (or range) of this column")
    p.add_argument("--partition", choices=["round-robin", "hash", "range"])
    p.add_argument("--bounds", help="range bounds, comma-separated (default: quantiles)")
    p.add_argument("--target", help="a two-class string target becomes 0/1")
    p.add_argument("--positive-class", help="the target's class stored as 1")
    p.add_argument("--format", choices=["csv", "parquet", "arrow"])
    p.set_defaults(func=cmd_ingest)

    sub.add_parser("datasets", parents=[common], help="list datasets").set_defaults(
        func=cmd_datasets
    )
    sub.add_parser("models", parents=[common], help="list models").set_defaults(func=cmd_models)

    p = sub.add_parser("train", parents=[common], help="run a training job with a progress bar")
    p.add_argument("--dataset", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", default="64", help="hidden widths, e.g. 64 or 64,32")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-split", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="", help="binary (default), multiclass or regression")
    p.add_argument("--activation", default="", help="relu (default), gelu, silu, tanh, ...")
    p.add_argument("--optimizer", default="", help="adam (default), adamw, sgd or lamb")
    p.add_argument("--lr-schedule", default="", help="constant (default), cosine or linear")
    p.add_argument("--early-stopping", type=int, default=0, help="patience in epochs; 0 = off")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps; 0 = per epoch")
    p.add_argument("--detach", action="store_true", help="print the job id and return")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", parents=[common], help="predictions through the gateway")
    p.add_argument("--model", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV file with the model's feature columns")
    source.add_argument("--json", help="JSON rows: [[...], ...] or [{feature: value}, ...]")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", parents=[common], help="the main job end to end, with its report")
    p.add_argument("--rows", type=int, default=120_000)
    p.add_argument("--epochs", type=int, default=3)
    p.set_defaults(func=cmd_demo)

    from onehop.bench import add_arguments

    p = sub.add_parser("bench", help="the measured report: figures next to their baselines")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Unavailable as exc:
        print(f"error: {exc.message} — is `onehop up` running?", file=sys.stderr)
    except OnehopError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
