"""Client side of the cache: several nodes as one key space, and the hint sender of a
zero-hop reader.

Placement is rendezvous (highest random weight) hashing: each key goes to the node with the
highest `blake2b(node, key)` score. Every caller (the gateway's gRPC and HTTP paths, the
Flight planner, tools) must place keys with `rank_nodes` / `node_for` from here, so that
they all agree; adding or removing one node moves only the keys that node gains or loses.

A node that is down or slower than the deadline is a miss (reads) or a dropped write, never
an error: the cache only ever saves work. A node that failed is skipped for `down_seconds`,
so a dead node costs one deadline, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
import pyarrow as pa
import pyarrow.flight as flight

from cache_service.flight import BATCH_GET_ACTION
from cache_service.store import CacheReader, PackedValues, check_keys
from onehop.channels import aio_channel
from onehop.errors import Unavailable, from_flight_error, from_rpc_error
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)

# Codes that mean "this node cannot answer now", as opposed to "this request is wrong".
_NODE_DOWN = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def _score(node: str, key: bytes) -> int:
    digest = hashlib.blake2b(node.encode() + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_nodes(key: bytes, nodes: Sequence[str]) -> list[str]:
    """`nodes` (host:port) best first for `key`: the first holds it, the next take over
    when it is removed from the list. The same on every caller."""
    return sorted(nodes, key=lambda node: (_score(node, key), node), reverse=True)


def node_for(key: bytes, nodes: Sequence[str]) -> str:
    """The node that holds `key`."""
    if not nodes:
        raise ValueError("no cache nodes configured")
    return max(nodes, key=lambda node: (_score(node, key), node))


def unpack_batch(reply: cache_pb2.BatchGetResponse) -> list[bytes | None]:
    """The values of a `BatchGet` answer, packed or not, in key order (None for a miss)."""
    if len(reply.sizes) or reply.packed_values:
        return PackedValues(list(reply.found), list(reply.sizes), reply.packed_values).values()
    return [
        value if found else None for found, value in zip(reply.found, reply.values, strict=True)
    ]


def flight_batch_get(
    client: flight.FlightClient,
    keys: Sequence[bytes],
    options: flight.FlightCallOptions | None = None,
) -> list[bytes | None]:
    """`BatchGet` through the cache's Flight server (`DoAction("BatchGet")`), the cheapest
    network path to a batch of hits; blocking (run it in a thread from asyncio). Errors
    arrive as onehop errors."""
    request = cache_pb2.BatchGetRequest(keys=check_keys(keys), packed=True)
    action = flight.Action(BATCH_GET_ACTION, request.SerializeToString())
    try:
        results = list(client.do_action(action, options))
    except (flight.FlightError, pa.ArrowException) as exc:
        raise from_flight_error(exc) from None
    if len(results) != 2:
        raise Unavailable(f"the cache's BatchGet action answered {len(results)} results, not 2")
    header = cache_pb2.BatchGetResponse.FromString(results[0].body.to_pybytes())
    # The values stay in Flight's buffer until each is copied out as bytes.
    return PackedValues(list(header.found), list(header.sizes), results[1].body).values()


class CacheClient:
    """The cache nodes in `nodes` as one key space (grpc.aio; use from one event loop).

    Reads return a miss for keys whose node is down or slow; writes return how many
    entries were written and skip down nodes. Errors of the request itself (a bad key, a
    value over the budget) are raised as onehop errors.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        settings: Settings,
        *,
        timeout: float | None = None,
        down_seconds: float = 1.0,
    ):
        if not nodes:
            raise ValueError("CacheClient needs at least one cache node")
        self.nodes = list(dict.fromkeys(nodes))
        self.timeout = settings.cache_timeout_seconds if timeout is None else timeout
        self.down_seconds = down_seconds
        self._channels = {node: aio_channel(node, settings) for node in self.nodes}
        self._stubs = {node: cache_pb2_grpc.CacheStub(ch) for node, ch in self._channels.items()}
        self._down_until: dict[str, float] = {}

    def node_for(self, key: bytes) -> str:
        return node_for(key, self.nodes)

    def is_down(self, node: str) -> bool:
        return time.monotonic() < self._down_until.get(node, 0.0)

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in key order; None for a miss, including every key of a node that is down."""
        keys = check_keys(keys)
        values: list[bytes | None] = [None] * len(keys)

        async def ask(stub: cache_pb2_grpc.CacheStub, idx: list[int]) -> None:
            reply = await stub.BatchGet(
                cache_pb2.BatchGetRequest(keys=[keys[i] for i in idx], packed=True),
                timeout=self.timeout,
            )
            for i, value in zip(idx, unpack_batch(reply), strict=True):
                values[i] = value

        await self._fan_out(keys, ask)
        return values

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        keys = check_keys(keys)
        found = [False] * len(keys)

        async def ask(stub: cache_pb2_grpc.CacheStub, idx: list[int]) -> None:
            reply = await stub.Contains(
                cache_pb2.ContainsRequest(keys=[keys[i] for i in idx]), timeout=self.timeout
            )
            for i, hit in zip(idx, reply.found, strict=True):
                found[i] = hit

        await self._fan_out(keys, ask)
        return found

    async def put_many(self, items: Sequence[tuple[bytes, bytes]], ttl_seconds: int = 0) -> int:
        """Write each entry to its node; returns how many were written (entries of a node
        that is down are dropped, as a cache may)."""
        keys = check_keys([key for key, _ in items])
        written = 0

        async def write(stub: cache_pb2_grpc.CacheStub, idx: list[int]) -> None:
            nonlocal written
            entries = [cache_pb2.Entry(key=keys[i], value=items[i][1]) for i in idx]
            reply = await stub.BatchPut(
                cache_pb2.BatchPutRequest(entries=entries, ttl_seconds=ttl_seconds),
                timeout=self.timeout,
            )
            written += reply.written

        await self._fan_out(keys, write)
        return written

    async def delete_many(self, keys: Sequence[bytes]) -> int:
        keys = check_keys(keys)
        deleted = 0

        async def delete(stub: cache_pb2_grpc.CacheStub, idx: list[int]) -> None:
            nonlocal deleted
            reply = await stub.Delete(
                cache_pb2.DeleteRequest(keys=[keys[i] for i in idx]), timeout=self.timeout
            )
            deleted += reply.deleted

        await self._fan_out(keys, delete)
        return deleted

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    async def _fan_out(
        self,
        keys: list[bytes],
        call: Callable[[cache_pb2_grpc.CacheStub, list[int]], Awaitable[None]],
    ) -> None:
        """One call per node (in parallel) with the indexes of the keys it holds."""
        by_node: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_node.setdefault(self.node_for(key), []).append(i)
        live = [node for node in by_node if not self.is_down(node)]
        results = await asyncio.gather(
            *(call(self._stubs[node], by_node[node]) for node in live), return_exceptions=True
        )
        for node, result in zip(live, results, strict=True):
            if isinstance(result, grpc.RpcError) and result.code() in _NODE_DOWN:
                self._down_until[node] = time.monotonic() + self.down_seconds
                log.info("cache node %s is down (%s): its keys are misses", node, result.code())
            elif isinstance(result, grpc.RpcError):
                raise from_rpc_error(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._down_until.pop(node, None)


class HintSender:
    """Sends a zero-hop reader's access hints (`CacheReader.take_hints`) to the cache
    service that owns the environment, every `interval` seconds, one bounded `Touch` at a
    time. A failed send drops its hints: they only steer eviction and stats.

    Start it on the event loop that owns `channel` (`start()`), `close()` flushes once more.
    """

    def __init__(
        self,
        reader: CacheReader,
        channel: grpc.aio.Channel,
        *,
        interval: float = 0.5,
        timeout: float = 0.5,
    ):
        self.reader = reader
        self._stub = cache_pb2_grpc.CacheStub(channel)
        self.interval = interval
        self.timeout = timeout
        self.sent = 0
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cache-hints")

    async def flush(self) -> int:
        """Send what the reader gathered now; returns how many hits the cache applied."""
        hints = self.reader.take_hints()
        if not hints.hits and not hints.misses and not hints.dropped:
            return 0
        request = cache_pb2.TouchRequest(
            hits=hints.hits, misses=hints.misses, dropped=hints.dropped
        )
        try:
            reply = await self._stub.Touch(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            self.dropped += len(hints.hits)
            log.debug("dropped %d cache access hints: %s", len(hints.hits), exc.code())
            return 0
        self.sent += len(hints.hits)
        return int(reply.applied)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()
