"""The cache against what a user would otherwise run, in one sitting (issue 4):

- `BatchGet` of 100 x 1 KiB over gRPC vs redis-py pipelined GET of the same 100 keys, both
  through the `onehop.v1.Cache` gRPC service (grpc.aio) and through the cache's Arrow Flight
  server (`DoAction("BatchGet")`, gRPC too, on Flight's C++ server);
- a zero-hop hit (`CacheReader` on the memory map, in this process) vs redis-py GET;
- a single `Get` over gRPC vs a bare grpc.aio server answering the same sizes;
- `Put` throughput from 64 concurrent clients vs LMDB's own batched-commit rate (64 puts
  per durable commit) in one process; and the store's group commit alone (64 threads
  calling `CacheStore.put`) against the same rate;
- hit ratio of the store's policy (segmented LRU) on a Zipf(0.99) prediction trace
  interleaved with sequential shard sweeps, at a budget of 10% of the working set, vs
  plain LRU and vs Belady's farthest-next-use (the offline optimum for equal sizes, a
  near-optimal bound here), all replayed over the same trace.

The cache runs as its own process (`onehop.launcher.Mesh`, as `onehop up` starts it); Redis
is Debian's `redis-server` on a free loopback port, without persistence. Without
`redis-server` or redis-py, the Redis figures keep their onehop value and report no
baseline (noted in their conditions). Clients are synchronous, one call in flight, for
both sides alike. `ctx.target` is not used: the benchmark needs its own cache.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import lmdb
import numpy as np
import pyarrow.flight as flight

from cache_service.client import flight_batch_get, unpack_batch
from cache_service.policy import SegmentedLru
from cache_service.store import CacheReader, CacheStore
from onehop.benchmark import HIT_RATE, LATENCY_MS, BenchContext, Figure, run_standalone, series
from onehop.channels import aio_channel, flight_location, sync_channel
from onehop.launcher import SERVICES, Mesh
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc

KiB = 1 << 10
VALUE_BYTES = KiB
BATCH = 100
PUT_CLIENTS = 64

# A grpc.aio server with one raw-bytes method (no protobuf, no interceptor, no store) that
# answers every request with a payload of the size a cache Get returns.
ECHO_SERVER = """
import asyncio, sys
import grpc

async def main(size):
    payload = bytes(size)

    async def answer(request, context):
        return payload

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(answer)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)

asyncio.run(main(int(sys.argv[1])))
"""


def run(ctx: BenchContext) -> list[Figure]:
    """Cache: BatchGet and GET vs Redis, zero-hop hits, Get vs bare gRPC, Puts, hit ratio."""
    seconds = 0.25 if ctx.quick else 4.0  # per side and figure (a multiple of it for some)
    settings = Settings(data_dir=ctx.workdir / "mesh", log_level="WARNING")
    cache_spec = next(spec for spec in SERVICES if spec.name == "cache")
    mesh = Mesh(
        settings,
        say=lambda _line: None,
        services=(cache_spec,),
        env={"ONEHOP_CACHE_SIZE_BYTES": str(1 << 30), "ONEHOP_LOG_LEVEL": "WARNING"},
    )
    endpoints = mesh.start()
    figures: list[Figure] = []
    try:
        address = endpoints["cache"]["grpc"]
        keys = [f"pred/bench/{i:064x}".encode() for i in range(BATCH)]
        values = [os.urandom(VALUE_BYTES) for _ in keys]
        flight_client = flight.connect(flight_location(endpoints["cache"]["flight"]))
        with sync_channel(address, settings) as channel, flight_client, _redis(ctx) as redis:
            stub = cache_pb2_grpc.CacheStub(channel)
            stub.BatchPut(
                cache_pb2.BatchPutRequest(
                    entries=[
                        cache_pb2.Entry(key=k, value=v) for k, v in zip(keys, values, strict=True)
                    ]
                )
            )
            if redis.client is not None:
                redis.client.mset(dict(zip(keys, values, strict=True)))
            figures += _batch_get(ctx, stub, flight_client, redis, keys, seconds)
            figures.append(_zero_hop(ctx, settings, redis, keys[0], seconds))
            figures.append(_get_vs_echo(ctx, stub, keys[0], seconds))
        figures += _puts(ctx, settings, address, seconds)
    finally:
        mesh.stop()
    figures += _hit_ratios(ctx)
    return figures


# --- Redis -------------------------------------------------------------------------------


class _Redis:
    """A redis-py client of a private redis-server, or none with the reason."""

    def __init__(self, client: Any, note: str):
        self.client = client
        self.note = note


@contextmanager
def _redis(ctx: BenchContext) -> Iterator[_Redis]:
    binary = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        redis = None  # type: ignore[assignment]
    if binary is None or redis is None:
        missing = "redis-server" if binary is None else "redis-py"
        yield _Redis(None, f"skipped: {missing} not installed (apt-get install redis-server)")
        return
    port = _free_port()
    workdir = ctx.workdir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield _Redis(client, f"redis-server on 127.0.0.1:{port}, no persistence")
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- timing ------------------------------------------------------------------------------


def _latencies(call: Callable[[], Any], seconds: float, warmup: int = 50) -> list[float]:
    """Seconds per call, calling back to back for about `seconds`."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end:
        for _ in range(20):
            began = clock()
            call()
            samples.append(clock() - began)
    return samples


def _interleaved(
    calls: dict[str, Callable[[], Any]], seconds: float, rounds: int = 8
) -> dict[str, list[float]]:
    """`_latencies` of each call in turns, so that a noisy neighbour hurts both sides alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name] += _latencies(call, seconds / rounds, warmup=10)
    return samples


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _record_ms(ctx: BenchContext, label: str, samples: list[float]) -> None:
    ctx.record(series(LATENCY_MS, label), [s * 1e3 for s in samples])


# --- the figures -------------------------------------------------------------------------


def _batch_get(
    ctx: BenchContext,
    stub: cache_pb2_grpc.CacheStub,
    flight_client: flight.FlightClient,
    redis: _Redis,
    keys: list,
    seconds: float,
) -> list[Figure]:
    """Keys/s of BatchGet through the gRPC service and through the Flight action, and of
    redis-py's pipelined GETs, in turns. Every side hands its caller a list of bytes."""
    request = cache_pb2.BatchGetRequest(keys=keys, packed=True)
    calls: dict[str, Callable[[], Any]] = {
        "grpc": lambda: unpack_batch(stub.BatchGet(request)),
        "flight": lambda: flight_batch_get(flight_client, keys),
    }
    if redis.client is not None:

        def pipelined() -> list:
            pipe = redis.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            return pipe.execute()

        calls["redis"] = pipelined
    samples = _interleaved(calls, 3 * seconds)
    rate = {name: BATCH * len(s) / sum(s) for name, s in samples.items()}
    _record_ms(ctx, "cache BatchGet x100 (gRPC)", samples["grpc"])
    _record_ms(ctx, "cache BatchGet x100 (Flight action)", samples["flight"])
    if "redis" in samples:
        _record_ms(ctx, "redis pipelined GET x100", samples["redis"])
    conditions = {"client": "one call in flight, sync, packed answer", "redis": redis.note}
    return [
        Figure(
            name="cache BatchGet 100 x 1 KiB over gRPC (onehop.v1.Cache)",
            value=rate["grpc"],
            unit="keys/s",
            baseline=rate.get("redis"),
            baseline_name="redis-py pipelined GET x100",
            goal="ratio >= 1.0",
            conditions=conditions,
        ),
        Figure(
            name="cache BatchGet 100 x 1 KiB over Arrow Flight (gRPC, DoAction)",
            value=rate["flight"],
            unit="keys/s",
            baseline=rate.get("redis"),
            baseline_name="redis-py pipelined GET x100",
            goal="ratio >= 1.0",
            conditions=conditions,
        ),
    ]


def _zero_hop(
    ctx: BenchContext, settings: Settings, redis: _Redis, key: bytes, seconds: float
) -> Figure:
    with CacheReader(settings.data_dir / "cache") as reader:
        assert reader.get_many([key])[0] is not None
        calls: dict[str, Callable[[], Any]] = {"onehop": lambda: reader.get_many([key])}
        if redis.client is not None:
            calls["redis"] = lambda: redis.client.get(key)
        samples = _interleaved(calls, 2 * seconds)
    _record_ms(ctx, "cache zero-hop hit", samples["onehop"])
    if "redis" in samples:
        _record_ms(ctx, "redis GET", samples["redis"])
    return Figure(
        name="cache zero-hop hit p50 (1 KiB, memory map)",
        value=_p50_us(samples["onehop"]),
        unit="µs",
        baseline=_p50_us(samples["redis"]) if "redis" in samples else None,
        baseline_name="redis-py GET p50",
        goal="ratio <= 0.1",
        conditions={"redis": redis.note},
    )


def _get_vs_echo(
    ctx: BenchContext, stub: cache_pb2_grpc.CacheStub, key: bytes, seconds: float
) -> Figure:
    request = cache_pb2.GetRequest(key=key)
    reply_bytes = stub.Get(request).ByteSize()
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(reply_bytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline())
        with sync_channel(f"127.0.0.1:{port}", Settings()) as channel:
            bare = channel.unary_unary("/bench.Echo/Echo")
            payload = request.SerializeToString()
            samples = _interleaved(
                {"onehop": lambda: stub.Get(request), "echo": lambda: bare(payload)},
                2 * seconds,
            )
    finally:
        assert echo.stdin is not None
        echo.stdin.close()
        echo.wait(10)
    _record_ms(ctx, "cache Get", samples["onehop"])
    _record_ms(ctx, "bare grpc.aio echo", samples["echo"])
    return Figure(
        name="cache Get p50 over gRPC (1 KiB)",
        value=_p50_us(samples["onehop"]),
        unit="µs",
        baseline=_p50_us(samples["echo"]),
        baseline_name="bare grpc.aio server, same sizes",
        goal="ratio <= 1.3",
        conditions={"reply_bytes": reply_bytes},
    )


def _puts(ctx: BenchContext, settings: Settings, address: str, seconds: float) -> list[Figure]:
    """Puts/s over gRPC from PUT_CLIENTS concurrent clients, and the same number of threads
    calling `CacheStore.put` in one process (group commit without gRPC), both next to LMDB's
    own rate at PUT_CLIENTS puts per durable commit."""

    async def clients() -> tuple[int, float]:
        written = 0
        async with aio_channel(address, settings) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            value = os.urandom(VALUE_BYTES)
            await stub.Put(cache_pb2.PutRequest(key=b"pred/bench/warm", value=value))
            end = time.perf_counter() + 2 * seconds

            async def client(worker: int) -> None:
                nonlocal written
                i = 0
                while time.perf_counter() < end:
                    key = f"pred/bench/put/{worker}/{i}".encode()
                    await stub.Put(cache_pb2.PutRequest(key=key, value=value))
                    written += 1
                    i += 1

            began = time.perf_counter()
            await asyncio.gather(*(client(w) for w in range(PUT_CLIENTS)))
            return written, time.perf_counter() - began

    written, elapsed = asyncio.run(clients())
    with sync_channel(address, settings) as channel:
        commits = cache_pb2_grpc.CacheStub(channel).GetStats(cache_pb2.GetStatsRequest()).commits
    baseline = _lmdb_batched_rate(ctx, 2 * seconds)
    in_process, per_commit = _store_put_rate(ctx, 2 * seconds)
    baseline_name = f"LMDB in one process, {PUT_CLIENTS} puts per durable commit"
    return [
        Figure(
            name=f"cache Put throughput, {PUT_CLIENTS} concurrent gRPC clients (1 KiB)",
            value=written / elapsed,
            unit="puts/s",
            baseline=baseline,
            baseline_name=baseline_name,
            conditions={"puts_per_commit": round(written / max(commits, 1), 1)},
        ),
        Figure(
            name=f"CacheStore.put throughput, {PUT_CLIENTS} threads in one process (1 KiB)",
            value=in_process,
            unit="puts/s",
            baseline=baseline,
            baseline_name=baseline_name,
            conditions={"puts_per_commit": per_commit},
        ),
    ]


def _store_put_rate(ctx: BenchContext, seconds: float) -> tuple[float, float]:
    """(puts/s, puts per commit) of PUT_CLIENTS threads calling `CacheStore.put`."""
    path = ctx.workdir / "store-puts"
    value = os.urandom(VALUE_BYTES)
    with CacheStore(path, 1 << 30) as store:
        end = time.perf_counter() + seconds
        counts = [0] * PUT_CLIENTS

        def client(worker: int) -> None:
            while time.perf_counter() < end:
                store.put(f"pred/bench/{worker}/{counts[worker]}".encode(), value)
                counts[worker] += 1

        began = time.perf_counter()
        with ThreadPoolExecutor(PUT_CLIENTS) as pool:
            list(pool.map(client, range(PUT_CLIENTS)))
        elapsed = time.perf_counter() - began
        commits = store.stats().commits
    shutil.rmtree(path, ignore_errors=True)
    return sum(counts) / elapsed, round(sum(counts) / max(commits, 1), 1)


BASELINE_KEYS = (256 << 20) // VALUE_BYTES


def _lmdb_batched_rate(ctx: BenchContext, seconds: float) -> float:
    """Puts/s that LMDB itself reaches with durable commits of PUT_CLIENTS puts each."""
    path = ctx.workdir / "lmdb-baseline"
    env = lmdb.open(str(path), map_size=1 << 30, sync=True, metasync=True)
    value = os.urandom(VALUE_BYTES)
    written = 0
    try:
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            with env.begin(write=True) as txn:
                for _ in range(PUT_CLIENTS):
                    # A bounded key space (256 MiB of values): a long run rewrites keys
                    # instead of filling the map.
                    txn.put(f"pred/bench/{written % BASELINE_KEYS}".encode(), value)
                    written += 1
        return written / (time.perf_counter() - began)
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)


# --- hit ratio: the same trace through the store's policy, LRU and Belady ------------------


def hit_trace(
    n_requests: int, n_predictions: int, n_shards: int, shard_every: int, seed: int = 0
) -> list[tuple[bytes, int]]:
    """(key, size) accesses: Zipf(0.99) over prediction rows (256 B each), with one access of
    a sequential sweep over the shards (64 KiB each) after every `shard_every` of them."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_predictions + 1) ** 0.99
    ranks = rng.choice(n_predictions, size=n_requests, p=weights / weights.sum())
    trace: list[tuple[bytes, int]] = []
    shard = 0
    for i, rank in enumerate(ranks.tolist()):
        trace.append((b"pred/%d" % rank, 256))
        if i % shard_every == shard_every - 1:
            trace.append((b"shard/%d" % shard, 64 * KiB))
            shard = (shard + 1) % n_shards
    return trace


def hits_segmented_lru(trace: list[tuple[bytes, int]], budget: int) -> list[bool]:
    """The store's policy, driven as the store drives it: a hit is a read, a miss writes
    the value through and evicts past the budget, sparing the key being written."""
    policy = SegmentedLru(budget)
    sizes: dict[bytes, int] = {}
    used = 0
    hits: list[bool] = []
    for key, size in trace:
        if key in sizes:
            policy.touch(key)
            hits.append(True)
            continue
        hits.append(False)
        policy.add(key, size)
        sizes[key] = size
        used += size
        for victim in policy.victims(used - budget, skip=(key,)):
            policy.remove(victim)
            used -= sizes.pop(victim)
    return hits


def hits_lru(trace: list[tuple[bytes, int]], budget: int) -> list[bool]:
    cache: OrderedDict[bytes, int] = OrderedDict()
    used = 0
    hits: list[bool] = []
    for key, size in trace:
        if key in cache:
            cache.move_to_end(key)
            hits.append(True)
            continue
        hits.append(False)
        cache[key] = size
        used += size
        while used > budget:
            used -= cache.popitem(last=False)[1]
    return hits


def hits_belady(trace: list[tuple[bytes, int]], budget: int) -> list[bool]:
    """Belady-Size, offline: on overflow evict the entry with the largest size x time to its
    next use (possibly the value just fetched, i.e. not caching it). With one size this is
    Belady's optimal policy; with sizes, a strong offline bound. One heap per size keyed by
    next use: the best victim is one of their tops."""
    never = len(trace)
    next_use = [never] * len(trace)
    seen: dict[bytes, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        key = trace[i][0]
        next_use[i] = seen.get(key, never)
        seen[key] = i
    cached: dict[bytes, int] = {}  # key -> its next use
    heaps: dict[int, list[tuple[int, bytes]]] = {}  # size -> [(-next use, key)], stale skipped
    sizes: dict[bytes, int] = {}
    used = 0
    hits: list[bool] = []
    for i, (key, size) in enumerate(trace):
        hit = key in cached
        hits.append(hit)
        if not hit:
            sizes[key] = size
            used += size
        cached[key] = next_use[i]
        heapq.heappush(heaps.setdefault(sizes[key], []), (-next_use[i], key))
        while used > budget:
            best: tuple[int, int] | None = None  # (cost, size)
            for entry_size, heap in heaps.items():
                while heap and cached.get(heap[0][1]) != -heap[0][0]:
                    heapq.heappop(heap)  # stale: evicted, or used again since
                if heap:
                    cost = (-heap[0][0] - i) * entry_size
                    if best is None or cost > best[0]:
                        best = (cost, entry_size)
            assert best is not None
            _, victim = heapq.heappop(heaps[best[1]])
            del cached[victim]
            used -= sizes.pop(victim)
    return hits


def _hit_ratios(ctx: BenchContext) -> list[Figure]:
    n_requests = 40_000 if ctx.quick else 400_000
    n_predictions, n_shards, shard_every = 20_000, 80, 10
    trace = hit_trace(n_requests, n_predictions, n_shards, shard_every)
    working_set = sum({key: size for key, size in trace}.values())
    budget = working_set // 10
    ratios = {}
    for name, replay in (
        ("segmented LRU", hits_segmented_lru),
        ("LRU", hits_lru),
        ("Belady", hits_belady),
    ):
        hits = replay(trace, budget)
        ratios[name] = sum(hits) / len(hits)
        window = max(1, len(hits) // 200)
        ctx.record(
            series(HIT_RATE, name),
            [sum(hits[i : i + window]) / window for i in range(0, len(hits), window)],
        )
    conditions = {
        "requests": len(trace),
        "prediction rows": n_predictions,
        "shards": n_shards,
        "shard access every": shard_every,
        "working set bytes": working_set,
        "budget bytes": budget,
    }
    return [
        Figure(
            name="cache hit ratio, Zipf(0.99) + shard sweeps, budget 10%",
            value=ratios["segmented LRU"],
            unit="",
            baseline=ratios["LRU"],
            baseline_name="plain LRU, same trace",
            conditions=conditions,
        ),
        Figure(
            name="cache hit ratio vs offline optimum",
            value=ratios["segmented LRU"],
            unit="",
            baseline=ratios["Belady"],
            baseline_name="Belady-Size (offline), same trace",
            conditions=conditions,
        ),
    ]


if __name__ == "__main__":
    sys.exit(run_standalone(run))
