"""The data plane against what a user would otherwise run, in one sitting:

- read of an N x 32 float32 dataset through the gateway's plan (every endpoint, redeemed at
  its first location by a separate client process that uses nothing but pyarrow) vs a raw
  `pyarrow.flight` server serving the same table from memory with as many endpoints: warm
  (the cache holds every prepared shard) and cold (each pass asks for a preparation nobody
  cached: the shard service prepares it, standard scaling + clipping, from its memory-mapped
  Arrow shards, then writes it through to the cache);
- ingest of a large CSV by the shard service (the gateway's "ingest" action: the service
  streams the file itself) vs `pyarrow.csv.read_csv` + `pyarrow.parquet.write_table` in one
  process, and the shard service's peak RSS (VmHWM) while it ingests;
- a training epoch's data (standardised features as one float32 matrix per batch) through
  the mesh, warm, vs `pyarrow.dataset` reading the same Parquet shards locally with the same
  preprocessing in numpy.

The mesh is real (`onehop.launcher.Mesh`: cache, shard service and gateway as processes);
`ctx.target` is not used, since the benchmark needs its own data directory for the sources.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pyarrow.parquet as pq

from onehop.benchmark import BenchContext, Figure, run_standalone
from onehop.channels import flight_location
from onehop.dataplane import put_dataset, run_action
from onehop.launcher import SERVICES, Mesh
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2

DATASET = "bench-wide"
CSV_DATASET = "bench-csv"
COLUMNS = 32
SHARDS = 8
# Batches of the raw baseline: the size the shard service and the cache send.
BASELINE_BATCH_BYTES = 4 << 20

# --- scripts run in processes of their own, with nothing but pyarrow (and numpy) -------------

# Serves one Arrow IPC file from memory, cut into as many endpoints as the plan has.
RAW_SERVER = """
import sys
import pyarrow as pa, pyarrow.flight as flight
path, parts, batch_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
table = pa.ipc.open_file(pa.memory_map(path)).read_all().combine_chunks()
step = -(-table.num_rows // parts)
pieces = [table.slice(k * step, step) for k in range(parts)]

class Raw(flight.FlightServerBase):
    def get_flight_info(self, context, descriptor):
        here = flight.Location.for_grpc_tcp("127.0.0.1", self.port)
        endpoints = [flight.FlightEndpoint(str(k).encode(), [here]) for k in range(parts)]
        return flight.FlightInfo(table.schema, descriptor, endpoints, table.num_rows, table.nbytes)

    def do_get(self, context, ticket):
        piece = pieces[int(ticket.ticket)]
        return flight.RecordBatchStream(
            pa.Table.from_batches(piece.to_batches(max_chunksize=batch_rows), table.schema)
        )

server = Raw("grpc+tcp://127.0.0.1:0")
print(server.port, flush=True)
sys.stdin.read()
server.shutdown()
"""

# The reading client, in a process of its own with nothing but pyarrow and numpy. One JSON
# request a line on stdin, one JSON answer a line on stdout:
# {"address", "command"}: plan at a Flight address ("path:NAME" or DataRequest hex) and read
#   every endpoint at its first location (the next on failure), one thread per endpoint;
# {"local", "means", "stds"}: the local baseline of an epoch, pyarrow.dataset over the same
#   Parquet files standardised in numpy.
# With "matrix", each batch also becomes one float32 matrix, as a training loop needs it.
CLIENT = """
import json, pathlib, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import pyarrow.dataset as ds
import pyarrow.flight as flight
clients = {}
def client(location):
    uri = location.uri.decode() if hasattr(location, "uri") else location
    if uri not in clients:
        clients[uri] = flight.connect(uri)
    return clients[uri]
def redeem(endpoint, matrix):
    error = None
    for location in endpoint.locations:
        try:
            rows = 0
            for chunk in client(location).do_get(endpoint.ticket):
                if matrix:
                    np.column_stack([c.to_numpy() for c in chunk.data.columns])
                rows += chunk.data.num_rows
            return rows
        except flight.FlightError as exc:
            error = exc
    raise error
def read(address, command, matrix):
    if command.startswith("path:"):
        descriptor = flight.FlightDescriptor.for_path(command[5:])
    else:
        descriptor = flight.FlightDescriptor.for_command(bytes.fromhex(command))
    info = client(address).get_flight_info(descriptor)
    with ThreadPoolExecutor(len(info.endpoints)) as pool:
        return sum(pool.map(lambda e: redeem(e, matrix), info.endpoints))
def local(directory, means, stds):
    means, stds = np.asarray(means, np.float32), np.asarray(stds, np.float32)
    files = sorted(str(p) for p in pathlib.Path(directory).glob("*.parquet"))
    rows = 0
    for batch in ds.dataset(files, format="parquet").to_batches():
        matrix = np.column_stack([c.to_numpy() for c in batch.columns])
        matrix = (matrix - means) / stds
        rows += batch.num_rows
    return rows
for line in sys.stdin:
    job = json.loads(line)
    start = time.perf_counter()
    if "local" in job:
        rows = local(job["local"], job["means"], job["stds"])
    else:
        rows = read(job["address"], job["command"], job.get("matrix", False))
    print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows}), flush=True)
"""

# The ingest baseline: what a user without onehop runs to turn a CSV into Parquet.
CSV_TO_PARQUET = """
import json, resource, sys, time
import pyarrow.csv as pacsv, pyarrow.parquet as pq
start = time.perf_counter()
pq.write_table(pacsv.read_csv(sys.argv[1]), sys.argv[2])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak}))
"""


def _python(script: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark helper failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class StockClient:
    """The CLIENT script as one long-lived process: passes reuse its connections, and no
    pass pays for an interpreter's start."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", CLIENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, job: dict[str, Any], rows: int) -> float:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(job) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark client died (exit {self._process.wait()})")
        answer = json.loads(line)
        if rows and answer["rows"] != rows:
            raise RuntimeError(f"{job} returned {answer['rows']} rows, not {rows}")
        return float(answer["seconds"])

    def read(self, address: str, command: str, rows: int = 0, matrix: bool = False) -> float:
        """Seconds of one full read of the plan of `command` at `address`."""
        return self._ask({"address": address, "command": command, "matrix": matrix}, rows)

    def local_epoch(self, directory: Path, means: list[float], stds: list[float]) -> float:
        """Seconds of the local baseline's epoch over the Parquet files in `directory`."""
        return self._ask({"local": str(directory), "means": means, "stds": stds}, 0)

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(30)


def wide_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((rows, COLUMNS), dtype=np.float32)
    data *= np.arange(1, COLUMNS + 1, dtype=np.float32)  # columns of different spreads
    return pa.table({f"f{k:02d}": data[:, k] for k in range(COLUMNS)})


def write_csv(path: Path, target_bytes: int) -> int:
    """A CSV of numeric columns and one categorical, appended in blocks up to target_bytes."""
    rng = np.random.default_rng(1)
    block = 50_000
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = None
    with open(path, "wb") as sink:
        writer = None
        while sink.tell() < target_bytes:
            columns: dict[str, Any] = {
                f"x{k}": np.round(rng.normal(100, 30, block), 3) for k in range(12)
            }
            columns["n"] = rng.integers(0, 1000, block)
            columns["city"] = rng.choice(["paris", "lima", "oslo", "quito"], block)
            batch = pa.RecordBatch.from_pydict(columns)
            if writer is None:
                schema = batch.schema
                writer = pacsv.CSVWriter(sink, schema)
            writer.write_batch(batch)
            sink.flush()
        if writer is not None:
            writer.close()
    return path.stat().st_size


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_cached(
    client: flight.FlightClient, request: data_pb2.DataRequest, cache: str, timeout: float
) -> bool:
    """Whether, within `timeout`, the plan puts the cache first for every endpoint."""
    deadline = time.monotonic() + timeout
    descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
    while True:
        info = client.get_flight_info(descriptor)
        if all(e.locations[0].uri.decode() == cache for e in info.endpoints):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _warm_up(
    reader: StockClient,
    client: flight.FlightClient,
    gateway: str,
    request: data_pb2.DataRequest,
    cache: str,
    timeout: float = 300,
) -> None:
    """Read passes until the cache holds every shard of `request`: a write-through is
    droppable under load, so one pass may not fill the cache."""
    deadline = time.monotonic() + timeout
    while True:
        reader.read(gateway, _command(request))
        if _wait_cached(client, request, cache, timeout=10):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the write-through did not fill the cache in time")


def run(ctx: BenchContext) -> list[Figure]:
    """Data plane: reads through the gateway vs raw Flight, ingest, an epoch vs local."""
    rows = 400_000 if ctx.quick else 2_000_000
    csv_bytes = (8 << 20) if ctx.quick else (2 << 30)
    # Quick reads take tens of milliseconds: more passes, so a median survives a busy box.
    passes = 7 if ctx.quick else 5
    settings = Settings(
        data_dir=ctx.workdir / "mesh",
        gateway_http_port=0,
        gateway_grpc_port=0,
        gateway_flight_port=0,
        default_shards=SHARDS,
        # Room for every preparation the run asks for (plain, epoch, each cold pass): an
        # eviction would turn a warm read cold.
        cache_size_bytes=max(1 << 30, rows * COLUMNS * 4 * (passes + 4)),
        log_level="WARNING",
    )
    services = tuple(s for s in SERVICES if s.name in ("cache", "shard", "gateway"))
    # No trainer: the data plane does not use it, and the gateway only dials it on demand.
    no_trainer = {"ONEHOP_TRAINER_ADDRESS": "127.0.0.1:9"}
    mesh = Mesh(settings, say=lambda _line: None, services=services, env=no_trainer)
    endpoints = mesh.start()
    try:
        gateway = flight_location(endpoints["gateway"]["flight"])
        cache = flight_location(endpoints["cache"]["flight"])
        shard_pid = mesh.children["shard"].process.pid
        with flight.connect(gateway) as client:
            # Ingest first, so the shard service's peak RSS is the ingest's own.
            figures = _ingest(ctx, settings, client, shard_pid, csv_bytes)
            table = wide_table(rows)
            put_dataset(client, DATASET, table)
            reader = StockClient()
            try:
                figures += _reads(ctx, reader, client, gateway, cache, table, passes)
                figures += _epoch(ctx, reader, client, gateway, cache, table, passes)
            finally:
                reader.close()
    finally:
        mesh.stop()
    return figures


def _ingest(
    ctx: BenchContext, settings: Settings, client: flight.FlightClient, pid: int, size: int
) -> list[Figure]:
    source = settings.data_dir / "sources" / "big.csv"
    actual = write_csv(source, size)
    start = time.perf_counter()
    body = data_pb2.IngestRequest(dataset=CSV_DATASET, source="sources/big.csv")
    info = data_pb2.DatasetInfo.FromString(run_action(client, "ingest", body.SerializeToString()))
    seconds = time.perf_counter() - start
    peak = peak_rss_mib(pid)
    baseline = _python(CSV_TO_PARQUET, str(source), str(ctx.workdir / "baseline.parquet"))
    source.unlink()
    conditions = {"csv_bytes": actual, "rows": info.rows, "shards": len(info.shards)}
    mb = actual / 1e6
    return [
        Figure(
            "ingest CSV throughput (shard service, streaming)",
            mb / seconds,
            "MB/s",
            baseline=mb / baseline["seconds"],
            baseline_name="pyarrow.csv.read_csv + parquet.write_table",
            goal="ratio >= 0.8",
            conditions=conditions,
        ),
        Figure(
            "ingest peak RSS of the shard service",
            peak,
            "MiB",
            baseline=baseline["peak_mib"],
            baseline_name="read_csv + write_table process peak RSS",
            goal="value <= 512",
            conditions=conditions,
        ),
    ]


def _command(request: data_pb2.DataRequest) -> str:
    return request.SerializeToString().hex()


def _reads(
    ctx: BenchContext,
    reader: StockClient,
    client: flight.FlightClient,
    gateway: str,
    cache: str,
    table: pa.Table,
    passes: int,
) -> list[Figure]:
    ipc = ctx.workdir / "table.arrow"
    with pa.ipc.new_file(ipc, table.schema) as writer:
        writer.write_table(table)
    batch_rows = max(1, BASELINE_BATCH_BYTES // (COLUMNS * 4))
    raw = subprocess.Popen(
        [sys.executable, "-c", RAW_SERVER, str(ipc), str(SHARDS), str(batch_rows)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert raw.stdout is not None
        raw_address = f"grpc+tcp://127.0.0.1:{raw.stdout.readline().strip()}"
        nbytes = table.nbytes / 1e9
        plain = data_pb2.DataRequest(dataset=DATASET)
        _warm_up(reader, client, gateway, plain, cache)
        reader.read(raw_address, f"path:{DATASET}")  # connects, as the gateway's were
        seconds: dict[str, list[float]] = {"raw": [], "warm": [], "cold": []}
        for k in range(passes):
            # Interleaved, so that a change in the machine's load hits all three alike.
            seconds["raw"].append(reader.read(raw_address, f"path:{DATASET}", table.num_rows))
            seconds["warm"].append(reader.read(gateway, _command(plain), table.num_rows))
            # A clip bound nobody asked for yet: a new cache key, so a miss every pass.
            cold = data_pb2.DataRequest(
                dataset=DATASET,
                preprocess=data_pb2.Preprocessing(
                    scaling=data_pb2.SCALING_STANDARD, clip_sigma=50.0 + k
                ),
            )
            seconds["cold"].append(reader.read(gateway, _command(cold), table.num_rows))
            # Each cold read on an idle mesh: its write-through lands before the next pass.
            _wait_cached(client, cold, cache, timeout=60)
    finally:
        if raw.stdin is not None:
            raw.stdin.close()
        raw.wait(30)
    rate = {name: nbytes / statistics.median(values) for name, values in seconds.items()}
    ctx.record("read_seconds/raw flight", seconds["raw"])
    ctx.record("read_seconds/onehop warm", seconds["warm"])
    ctx.record("read_seconds/onehop cold", seconds["cold"])
    conditions = {"rows": table.num_rows, "columns": COLUMNS, "endpoints": SHARDS}
    return [
        Figure(
            "read via gateway plan, warm (cache holds shards)",
            rate["warm"],
            "GB/s",
            baseline=rate["raw"],
            baseline_name="raw pyarrow.flight server, same table in memory",
            goal="ratio >= 0.9",
            conditions=conditions,
        ),
        Figure(
            "read via gateway plan, cold (shard service prepares: scaling + clip)",
            rate["cold"],
            "GB/s",
            baseline=rate["raw"],
            baseline_name="raw pyarrow.flight server, same table in memory",
            goal="ratio >= 0.5",
            conditions=conditions,
        ),
    ]


def _epoch(
    ctx: BenchContext,
    reader: StockClient,
    client: flight.FlightClient,
    gateway: str,
    cache: str,
    table: pa.Table,
    passes: int,
) -> list[Figure]:
    request = data_pb2.DataRequest(
        dataset=DATASET, preprocess=data_pb2.Preprocessing(scaling=data_pb2.SCALING_STANDARD)
    )
    _warm_up(reader, client, gateway, request, cache)
    body = data_pb2.DataRequest(dataset=DATASET).SerializeToString()
    info = data_pb2.DatasetInfo.FromString(run_action(client, "describe", body))
    means = [c.mean for c in info.columns]
    stds = [c.std for c in info.columns]
    # The user's own copy: the same table as Parquet files, one per shard, written with
    # pyarrow's defaults (the shard service stores Arrow IPC, which is not the baseline).
    shards = ctx.workdir / "local-parquet"
    shards.mkdir(exist_ok=True)
    step = -(-table.num_rows // SHARDS)
    for k in range(SHARDS):
        pq.write_table(table.slice(k * step, step), shards / f"part-{k}.parquet")
    rows = table.num_rows
    mesh: list[float] = []
    local: list[float] = []
    for _ in range(passes):  # interleaved, as the reads are
        mesh.append(reader.read(gateway, _command(request), rows, matrix=True))
        local.append(reader.local_epoch(shards, means, stds))
    ctx.record("epoch_seconds/onehop warm", mesh)
    ctx.record("epoch_seconds/pyarrow.dataset local", local)
    millions = table.num_rows / 1e6
    return [
        Figure(
            "epoch through the mesh, warm (standardised matrix per batch)",
            millions / statistics.median(mesh),
            "M rows/s",
            baseline=millions / statistics.median(local),
            baseline_name="pyarrow.dataset local Parquet + numpy standardisation",
            goal="ratio >= 1.0",
            conditions={"rows": table.num_rows, "columns": COLUMNS},
        )
    ]


if __name__ == "__main__":
    raise SystemExit(run_standalone(run))
