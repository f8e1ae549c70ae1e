"""The inference router: the predict path of DESIGN §2, shared by the gRPC and HTTP edges.

Per request: resolve the model's serving version and weights digest (cached for
`model_info_ttl_seconds`; past that served stale while one background refresh asks the
trainer, for up to `model_info_stale_seconds` more if it cannot answer), key every row by
(model, digest, row bytes), look all keys up in one batch — from the local LMDB replica's memory map (0 hops) or the cache service (1 hop) —
send only the missing rows to the trainer in one call (1 hop), merge in order, and write the
new rows back to the cache after the response, off the critical path and droppable.

Every request is admitted (bounded concurrency and queue) and runs under one deadline that
every downstream call inherits; a cache that is down or slower than `cache_timeout_seconds`
is bypassed; trainer replicas are called round robin with failover (onehop.channels.Replicas).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from prometheus_client import Counter, Histogram

from cache_service.client import CacheClient, HintSender
from cache_service.store import CacheReader
from gateway import tensors
from gateway.admission import Admission
from gateway.memo import ResponseMemo
from gateway.tensors import ModelMetadata
from onehop.channels import Replicas, aio_channel
from onehop.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    OnehopError,
    from_rpc_error,
)
from onehop.keys import prediction_keys, validate_name
from onehop.settings import Settings
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from protos.onehop.v1 import trainer_pb2, trainer_pb2_grpc

__all__ = ["InferResult", "InferenceRouter", "ModelMetadata"]

log = logging.getLogger(__name__)

# The response parameter in which the trainer names the weights that computed the rows.
DIGEST_PARAMETER = "onehop-weights-digest"
# Deadline of metadata calls (and the most a resolve may take of a request's deadline).
_CONTROL_TIMEOUT_S = 10.0
# Deadline of a background refresh of expired model info: short, since requests are served
# with the stale info meanwhile and the next one after a failure starts another.
_REFRESH_TIMEOUT_S = 2.0
# After a failed refresh the next one waits this long: an unreachable trainer gets one
# GetModel a second per model from the refreshes, not one per request.
_REFRESH_RETRY_S = 1.0
_WRITEBACK_TIMEOUT_S = 5.0
# A write-back waits this long for others to share its round.
_WRITEBACK_LINGER_S = 0.05
# How long close() lets pending write-backs finish before cancelling them.
_CLOSE_WAIT_S = 1.0
# Lookups of up to this many keys read the memory map on the event loop: a few microseconds
# of page-cache reads, against ~100 µs of handing a small batch to a thread and back.
_INLINE_READ_KEYS = 256
# A local replica that failed to open is retried no more often than this.
_READER_RETRY_S = 5.0

REQUESTS = Counter(
    "onehop_gateway_infer_requests",
    "Inference requests by cache outcome (hit, partial, miss, bypass) or error.",
    ["outcome"],
)
ROWS = Counter(
    "onehop_gateway_infer_rows",
    "Rows of inference requests by prediction-cache result (hit or miss).",
    ["result"],
)
LATENCY = Histogram(
    "onehop_gateway_infer_seconds",
    "Inference latency at the gateway by cache outcome.",
    ["outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HOPS = Histogram(
    "onehop_gateway_infer_hops",
    "Network calls on the critical path of an inference request, by cache outcome.",
    ["outcome"],
    buckets=(0, 1, 2, 3, 4),
)
_ROWS_HIT, _ROWS_MISS = ROWS.labels("hit"), ROWS.labels("miss")


@functools.cache
def _outcome_metrics(outcome: str) -> tuple[Any, Any, Any]:
    """(requests, latency, hops) children for one outcome, bound once: `labels()` costs
    more than the hit path can spare."""
    return REQUESTS.labels(outcome), LATENCY.labels(outcome), HOPS.labels(outcome)


MODEL_CALLS = Counter(
    "onehop_gateway_model_calls",
    "Inference calls from the gateway to the trainer (coalesced misses count once).",
)
STALE_MODEL_INFO = Counter(
    "onehop_gateway_stale_model_info",
    "Model-info lookups answered with info past model_info_ttl_seconds (a refresh running, "
    "or the trainer unreachable), within model_info_stale_seconds.",
)
REFRESHES = Counter(
    "onehop_gateway_model_info_refreshes",
    "Background refreshes of expired model info by result (refreshed, failed).",
    ["result"],
)
WRITEBACKS = Counter(
    "onehop_gateway_writebacks",
    "Prediction write-backs to the cache by result (written, failed, dropped, skipped).",
    ["result"],
)


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]  # name → [n, k] float32, the model's output order
    model_version: str
    cache: str  # "hit" | "partial" | "miss" | "bypass"
    hops: int  # network calls on the critical path
    digest: str = ""  # the weights digest the rows were keyed under


@dataclass(frozen=True)
class _Model:
    """What the predict path needs to know of one resolved model version."""

    name: str
    version: str
    digest: str
    input_name: str
    n_features: int  # 0 = unknown; the trainer checks
    # (output name, width) in the order a cached row's float32 values are concatenated;
    # None when the outputs are not all FP32 [-1, k] (then nothing is cached).
    layout: tuple[tuple[str, int], ...] | None

    @property
    def row_bytes(self) -> int:
        return 4 * sum(width for _, width in self.layout or ())


_T = TypeVar("_T")


class _SingleFlight:
    """Concurrent calls with the same key share one execution (DESIGN §2: identical misses
    are coalesced). A caller that is cancelled does not cancel the others' call."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Future[Any]] = {}
        self._lingers: dict[Hashable, asyncio.Future[Any]] = {}

    def linger(self, key: Hashable, until: asyncio.Future[Any]) -> None:
        """Called from within `key`'s call: its answer keeps being shared after it finishes,
        until `until` is done (the write-back that makes the answer findable elsewhere)."""
        self._lingers[key] = until

    async def do(self, key: Hashable, call: Callable[[], Awaitable[_T]], deadline: float) -> _T:
        """The shared call's result; each caller waits no longer than its own `deadline`
        (time.monotonic()), whatever the call's own deadline."""
        future = self._calls.get(key)
        if future is None:
            future = asyncio.ensure_future(call())
            self._calls[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed while it waited for a shared call"
            ) from None

    def _forget(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        until = self._lingers.pop(key, None)
        if until is not None and not until.done():
            until.add_done_callback(lambda _: self._forget(key, done))
            return
        if self._calls.get(key) is done:
            del self._calls[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so a call nobody awaits any more is not logged


class InferenceRouter:
    """Routes inference between the prediction cache and the trainer; no gRPC in its API.

    The trainer replicas and the cache client belong to the caller; `close()` settles
    pending write-backs and closes what the router opened itself (its write client, the
    local replica reader and its hint sender).
    """

    def __init__(
        self,
        settings: Settings,
        trainer: Replicas | grpc.aio.Channel,
        cache: CacheClient | None,
    ):
        self.settings = settings
        self._trainers = (
            trainer
            if isinstance(trainer, Replicas)
            else Replicas([trainer], settings.trainer_attempt_timeout_seconds)
        )
        # Prebuilt answers of repeated identical requests, for the edges (gateway/memo.py).
        self.answers = ResponseMemo(settings.response_memo_bytes)
        self.admission = Admission(
            settings.max_concurrent_requests,
            settings.max_queued_requests,
            settings.queue_timeout_seconds,
        )
        self._cache = cache
        # Write-backs get a longer deadline than lookups: they are off the critical path.
        self._writes = (
            CacheClient(cache.nodes, settings, timeout=_WRITEBACK_TIMEOUT_S) if cache else None
        )
        self._hints: HintSender | None = None
        self._hint_channel: grpc.aio.Channel | None = None
        self._cache_path = Path(settings.cache_path) if settings.cache_path else None
        self._reader: Any = None
        self._reader_retry_at = 0.0
        self._reader_lock = asyncio.Lock()
        # (model, requested version) → (when the trainer answered, what it resolved to).
        self._models: dict[tuple[str, int], tuple[float, _Model]] = {}
        # At most one background refresh of expired model info per (model, version).
        self._refreshes: dict[tuple[str, int], asyncio.Task[None]] = {}
        # Output layout and input shape per weights digest: fixed by the weights, so kept.
        self._shapes: dict[
            tuple[str, str], tuple[str, int, tuple[tuple[str, int], ...] | None]
        ] = {}
        self._flights = _SingleFlight()
        # Write-backs wait here and leave together, one put per cache node per round.
        self._queued: list[tuple[list[bytes], list[bytes], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._writing = 0  # write-backs in the round being sent
        self.writebacks_dropped = 0

    # --- the predict path ---------------------------------------------------------------

    async def infer(
        self, model: str, version: str, rows: np.ndarray, timeout: float | None = None
    ) -> InferResult:
        """Predictions for `rows` ([n, n_features]) from `model` at `version` ("" = serving).

        `timeout` is the client's remaining deadline (None = `request_timeout_seconds`): the
        request never waits past it, and every downstream call gets what is left of it."""
        started = time.perf_counter()
        outcome = "error"
        budget = self.settings.request_timeout_seconds if timeout is None else timeout
        # Every await below is bounded by what is left of this: downstream calls get it as
        # their gRPC deadline, waits on shared calls and on admission end at it.
        deadline = time.monotonic() + budget
        try:
            async with self.admission.slot(budget):
                result = await self._infer(model, version, rows, deadline)
            outcome = result.cache
            _outcome_metrics(outcome)[2].observe(result.hops)
            return result
        finally:
            requests, latency, _ = _outcome_metrics(outcome)
            requests.inc()
            latency.observe(time.perf_counter() - started)

    async def _infer(
        self, model: str, version: str, rows: np.ndarray, deadline: float
    ) -> InferResult:
        validate_name("model", model)
        requested = _parse_version(version)
        rows = _validate_rows(rows)
        resolved, hops = await self._resolve(model, requested, deadline)
        if resolved.n_features and rows.shape[1] != resolved.n_features:
            raise InvalidArgument(
                f"model {model!r} version {resolved.version} takes {resolved.n_features} "
                f"features per row (shape [-1, {resolved.n_features}]); got {rows.shape[1]}"
            )
        keys = prediction_keys(model, resolved.digest, rows)

        values: list[bytes | None] | None = None
        if resolved.layout is not None:
            values, lookup_hops = await self._lookup(keys, deadline)
            hops += lookup_hops
        hit = np.zeros(len(keys), dtype=bool)
        if values is not None:
            size = resolved.row_bytes
            hit[:] = [v is not None and len(v) == size for v in values]
        n_hits = int(hit.sum())
        if n_hits:
            _ROWS_HIT.inc(n_hits)
        if n_hits < len(keys):
            _ROWS_MISS.inc(len(keys) - n_hits)

        outputs: dict[str, np.ndarray] = {}
        if n_hits:
            assert values is not None and resolved.layout is not None
            found = [v for v, is_hit in zip(values, hit, strict=True) if is_hit and v is not None]
            for name, array in _decode(found, resolved.layout).items():
                outputs[name] = np.empty((len(keys), array.shape[1]), dtype=np.float32)
                outputs[name][hit] = array
        if n_hits < len(keys):
            missing = np.flatnonzero(~hit)
            # Rows repeated within the batch are computed once.
            first, inverse = _dedupe([keys[i] for i in missing])
            unique = missing[first]
            unique_keys = [keys[i] for i in unique]
            computed, digest = await self._compute(
                resolved, rows[unique], unique_keys, deadline, write_back=values is not None
            )
            hops += 1
            if not n_hits:
                outputs = {name: array[inverse] for name, array in computed.items()}
            elif _layout_of(computed) == resolved.layout:
                for name, array in computed.items():
                    outputs[name][missing] = array[inverse]
            else:
                raise Internal.wrap(
                    RuntimeError(f"model {model!r} outputs differ from its metadata")
                )

        if values is None:
            cache = "bypass"
        elif n_hits == len(keys):
            cache = "hit"
        elif n_hits:
            cache = "partial"
        else:
            cache = "miss"
        return InferResult(
            outputs=outputs,
            model_version=resolved.version,
            cache=cache,
            hops=hops,
            digest=resolved.digest,
        )

    def resolved(self, model: str, version: str) -> tuple[str, str] | None:
        """(version, weights digest) that `model` at `version` resolves to now, if known
        without asking the trainer (None otherwise, or for a version it would refuse)."""
        try:
            cached = self._cached(model, _parse_version(version))
        except InvalidArgument:
            return None
        return None if cached is None else (cached.version, cached.digest)

    def count_prebuilt_hit(self, rows: int, seconds: float) -> None:
        """Metrics for a request an edge answered from the response memo: a 0-hop hit."""
        requests, latency, hops = _outcome_metrics("hit")
        requests.inc()
        latency.observe(seconds)
        hops.observe(0)
        _ROWS_HIT.inc(rows)

    async def _resolve(self, model: str, version: int, deadline: float) -> tuple[_Model, int]:
        """The model's resolved version, digest and shapes, and the hops spent learning them.
        Only a request for which nothing usable is known waits for the trainer (under its own
        deadline, sharing one call with the others)."""
        cached = self._cached(model, version)
        if cached is not None:
            return cached, 0
        return await self._fetch_shared(model, version, deadline)

    def _cached(self, model: str, version: int) -> _Model | None:
        """What is known of `model` at `version` without waiting (stale-while-revalidate):
        the info the trainer gave within `model_info_ttl_seconds`; past that, the same info
        while one background refresh asks the trainer again, for `model_info_stale_seconds`
        at most (a frozen or unreachable trainer does not fail requests the cache can
        answer); None when nothing usable is known."""
        cached = self._models.get((model, version))
        if cached is None:
            return None
        fetched_at, resolved = cached
        age = time.monotonic() - fetched_at
        ttl = self.settings.model_info_ttl_seconds
        if age < ttl:
            return resolved
        if age >= ttl + self.settings.model_info_stale_seconds:
            return None
        STALE_MODEL_INFO.inc()
        if (model, version) not in self._refreshes:
            task = asyncio.create_task(
                self._refresh(model, version), name=f"refresh {model} {version}"
            )
            self._refreshes[(model, version)] = task
            task.add_done_callback(lambda _: self._refreshes.pop((model, version), None))
        return resolved

    async def _refresh(self, model: str, version: int) -> None:
        """Ask the trainer again for expired model info; a promotion shows from here on.
        A failure keeps the stale info (see _cached), except NotFound: the trainer answered
        that the model or version is gone."""
        deadline = time.monotonic() + _REFRESH_TIMEOUT_S
        try:
            await self._fetch_shared(model, version, deadline)
        except NotFound:
            REFRESHES.labels("failed").inc()
            self._models.pop((model, version), None)
        except OnehopError as exc:
            REFRESHES.labels("failed").inc()
            cached = self._models.get((model, version))
            if cached is not None:
                log.warning(
                    "cannot refresh model info of %s (%s); serving version %s (weights %s) "
                    "from %.1f s ago, for at most %.0f s past its TTL",
                    model,
                    exc.message,
                    cached[1].version,
                    cached[1].digest[:12],
                    time.monotonic() - cached[0],
                    self.settings.model_info_stale_seconds,
                )
            await asyncio.sleep(_REFRESH_RETRY_S)  # holds this refresh's place meanwhile
        else:
            REFRESHES.labels("refreshed").inc()

    async def _fetch_shared(self, model: str, version: int, deadline: float) -> tuple[_Model, int]:
        """`_fetch`, one call shared by every request and refresh that asks meanwhile."""
        return await self._flights.do(
            ("resolve", model, version), lambda: self._fetch(model, version, deadline), deadline
        )

    async def _fetch(self, model: str, version: int, deadline: float) -> tuple[_Model, int]:
        info = await self._call(
            trainer_pb2_grpc.TrainerStub,
            "GetModel",
            trainer_pb2.GetModelRequest(name=model, version=version),
            _remaining(deadline, _CONTROL_TIMEOUT_S),
        )
        hops = 1
        resolved_version = str(info.version)
        shape = self._shapes.get((model, info.weights_digest))
        if shape is None:
            metadata = await self.model_metadata(model, resolved_version, deadline)
            hops += 1
            shape = _shape_of(metadata, len(info.features))
            self._shapes[(model, info.weights_digest)] = shape
        input_name, n_features, layout = shape
        resolved = _Model(
            name=model,
            version=resolved_version,
            digest=info.weights_digest,
            input_name=input_name,
            n_features=n_features,
            layout=layout,
        )
        now = time.monotonic()
        self._models[(model, version)] = (now, resolved)
        # What "serving" resolved to is also what that version number pins.
        self._models[(model, info.version)] = (now, resolved)
        return resolved, hops

    def _forget_model(self, model: str) -> None:
        """Drop what is known of every version of `model`: resolve afresh next time."""
        self._models = {k: v for k, v in self._models.items() if k[0] != model}

    async def _lookup(
        self, keys: list[bytes], deadline: float
    ) -> tuple[list[bytes | None] | None, int]:
        """Every key in one batch: (values or None per key, hops). None for the whole list
        means the cache could not be asked (down, slow, absent): a bypass, not an error."""
        timeout = _remaining(deadline, self.settings.cache_timeout_seconds)
        reader = await self._local_reader()
        if reader is not None:
            try:
                if len(keys) <= _INLINE_READ_KEYS:
                    values = reader.get_many(keys)
                else:
                    values = await asyncio.wait_for(
                        asyncio.to_thread(reader.get_many, keys), timeout
                    )
            # A failing local replica is a miss, never a failed request.
            except Exception:
                log.warning("local cache read failed; bypassing the cache", exc_info=True)
                return None, 0
            if len(values) != len(keys):
                log.warning("local cache answered %d of %d keys; bypassing", len(values), len(keys))
                return None, 0
            values = list(values)
            missing = [i for i, value in enumerate(values) if value is None]
            if not missing or self._cache is None or len(self._cache.nodes) < 2:
                return values, 0
            # Several nodes: the local replica holds only its share; ask for the rest.
            remote = await self._remote_lookup([keys[i] for i in missing], timeout)
            for i, value in zip(missing, remote or [None] * len(missing), strict=True):
                values[i] = value
            return values, 1
        if self._cache is None:
            return None, 0
        return await self._remote_lookup(keys, timeout), 1

    async def _remote_lookup(self, keys: list[bytes], timeout: float) -> list[bytes | None] | None:
        """The cache nodes' values for `keys`; None when every node holding them is down or
        slow (the cache client turns a down node's keys into misses and skips it a while)."""
        assert self._cache is not None
        lookup = self._cache.get_many(keys)
        try:
            if timeout < self._cache.timeout:
                values = await asyncio.wait_for(lookup, timeout)
            else:
                values = await lookup
        except (OnehopError, TimeoutError) as exc:
            log.debug("cache lookup failed (%s); bypassing the cache", exc)
            return None
        if all(self._cache.is_down(node) for node in {self._cache.node_for(k) for k in keys}):
            return None
        return values

    async def _local_reader(self) -> Any:
        """The LMDB replica on this host, opened read-only once its data file exists."""
        if self._reader is not None or self._cache_path is None:
            return self._reader
        if time.monotonic() < self._reader_retry_at:
            return None
        async with self._reader_lock:
            if self._reader is None and (self._cache_path / "data.mdb").exists():
                try:
                    self._reader = await asyncio.to_thread(CacheReader, self._cache_path)
                    log.info("reading prediction hits from the local replica %s", self._cache_path)
                    if self._cache is not None:
                        # Hits read here reach the cache's eviction and stats as hints.
                        self._hint_channel = aio_channel(self._cache.nodes[0], self.settings)
                        self._hints = HintSender(self._reader, self._hint_channel)
                        self._hints.start()
                except Exception:
                    log.warning(
                        "cannot open the local cache replica %s", self._cache_path, exc_info=True
                    )
                    self._reader_retry_at = time.monotonic() + _READER_RETRY_S
            elif self._reader is None:
                self._reader_retry_at = time.monotonic() + _READER_RETRY_S
        return self._reader

    async def _compute(
        self,
        model: _Model,
        rows: np.ndarray,
        keys: list[bytes],
        deadline: float,
        write_back: bool,
    ) -> tuple[dict[str, np.ndarray], str | None]:
        """One trainer call for the missing rows, shared by concurrent identical requests
        (under the first one's deadline): (outputs, the weights digest that computed them).
        The write-back is scheduled once, by the shared call."""
        flight = ("infer", model.name, model.version, hashlib.sha256(b"\n".join(keys)).digest())

        async def compute() -> tuple[dict[str, np.ndarray], str | None]:
            computed, digest = await self._call_model(model, rows, deadline)
            if write_back:
                task = self._schedule_writeback(model, digest, rows, keys, computed)
                if task is not None:
                    # A request whose lookup missed these rows just before the write-back
                    # lands still shares this answer instead of calling the model again.
                    self._flights.linger(flight, task)
            return computed, digest

        return await self._flights.do(flight, compute, deadline)

    async def _call_model(
        self, model: _Model, rows: np.ndarray, deadline: float
    ) -> tuple[dict[str, np.ndarray], str | None]:
        request = tensors.grpc_infer_request(model.name, model.version, rows, model.input_name)
        MODEL_CALLS.inc()
        try:
            response = await self._call(
                grpc_service_pb2_grpc.GRPCInferenceServiceStub,
                "ModelInfer",
                request,
                _remaining(deadline),
            )
        except NotFound:
            # The resolved version may be gone (deleted, re-registered): resolve afresh next time.
            self._forget_model(model.name)
            raise
        try:
            outputs = tensors.grpc_outputs(response, len(rows))
        except InvalidArgument as exc:
            raise Internal.wrap(exc) from None
        digest = tensors.grpc_parameters(response.parameters).get(DIGEST_PARAMETER)
        return outputs, digest if isinstance(digest, str) and digest else None

    # --- write-back ---------------------------------------------------------------------

    def _schedule_writeback(
        self,
        model: _Model,
        digest: str | None,
        rows: np.ndarray,
        keys: list[bytes],
        outputs: dict[str, np.ndarray],
    ) -> asyncio.Future[None] | None:
        if self._writes is None or model.layout is None:
            return None
        if digest is None:
            WRITEBACKS.labels("skipped").inc()
            log.warning("trainer named no weights digest for %s; not caching its rows", model.name)
            return None
        if _layout_of(outputs) != model.layout:
            WRITEBACKS.labels("skipped").inc()
            return None
        if digest != model.digest:
            # The trainer served other weights than we resolved: key by what computed the rows.
            keys = prediction_keys(model.name, digest, rows)
            self._forget_model(model.name)
        if len(self._queued) + self._writing >= self.settings.max_pending_writebacks:
            self.writebacks_dropped += 1
            WRITEBACKS.labels("dropped").inc()
            return None
        written = asyncio.get_running_loop().create_future()
        self._queued.append((keys, _encode(outputs, model.layout), written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name="write-back")
        return written

    async def _write_queued(self) -> None:
        """Send the queued write-backs in rounds, all that gathered during the last round
        (and a short linger before it) in one put per node: one LMDB commit for many
        requests' rows, and fewer writes competing with the requests that follow."""
        assert self._writes is not None
        while self._queued:
            await asyncio.sleep(_WRITEBACK_LINGER_S)
            batch, self._queued = self._queued, []
            self._writing = len(batch)
            items = [item for keys, values, _ in batch for item in zip(keys, values, strict=True)]
            try:
                await self._writes.put_many(items)
                WRITEBACKS.labels("written").inc(len(batch))
            except OnehopError as exc:
                WRITEBACKS.labels("failed").inc(len(batch))
                log.debug("prediction write-back failed: %s", exc.message)
            finally:
                self._writing = 0
                for _, _, written in batch:
                    if not written.done():
                        written.set_result(None)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for the pending write-backs; True when none is left."""
        writer = self._writer
        if writer is not None and not writer.done():
            await asyncio.wait({writer}, timeout=timeout)
        return not self._queued and not self._writing

    async def close(self) -> None:
        refreshes = list(self._refreshes.values())
        for task in refreshes:
            task.cancel()
        await asyncio.gather(*refreshes, return_exceptions=True)
        await self.drain(_CLOSE_WAIT_S)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._hints is not None:
            await self._hints.close()
        if self._hint_channel is not None:
            await self._hint_channel.close()
        if self._writes is not None:
            await self._writes.close()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await asyncio.to_thread(reader.close)

    # --- metadata and readiness, forwarded to the trainer --------------------------------

    async def _call(self, stub_type: type, method: str, request: Any, timeout: float) -> Any:
        """One idempotent call to a trainer replica (failover included), through the table."""
        try:
            return await self._trainers.call(stub_type, method, request, timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def model_metadata(
        self, model: str, version: str, deadline: float | None = None
    ) -> ModelMetadata:
        validate_name("model", model)
        _parse_version(version)
        response = await self._call(
            grpc_service_pb2_grpc.GRPCInferenceServiceStub,
            "ModelMetadata",
            grpc_service_pb2.ModelMetadataRequest(name=model, version=version),
            _remaining(deadline, _CONTROL_TIMEOUT_S),
        )
        return tensors.metadata_from_grpc(response)

    async def model_ready(self, model: str, version: str) -> bool:
        """Whether the trainer can serve the model now; unknown model → NotFound."""
        validate_name("model", model)
        _parse_version(version)
        try:
            response = await self._call(
                grpc_service_pb2_grpc.GRPCInferenceServiceStub,
                "ModelReady",
                grpc_service_pb2.ModelReadyRequest(name=model, version=version),
                _CONTROL_TIMEOUT_S,
            )
        except (NotFound, InvalidArgument):
            raise
        except OnehopError:
            return False
        return bool(response.ready)

    async def server_ready(self) -> bool:
        """Ready when a trainer that computes the misses is."""
        try:
            response = await self._call(
                grpc_service_pb2_grpc.GRPCInferenceServiceStub,
                "ServerReady",
                grpc_service_pb2.ServerReadyRequest(),
                _CONTROL_TIMEOUT_S,
            )
        except OnehopError:
            return False
        return bool(response.ready)


# --- helpers ----------------------------------------------------------------------------


def _remaining(deadline: float | None, cap: float | None = None) -> float:
    """Seconds left until `deadline` (monotonic), at most `cap`; DeadlineExceeded when none."""
    if deadline is None:
        assert cap is not None
        return cap
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed before it was answered")
    return left if cap is None else min(left, cap)


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock (asyncio.timeout_at)."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _parse_version(version: str) -> int:
    """ "" = the serving version; otherwise a positive integer."""
    if version == "":
        return 0
    if not version.isascii() or not version.isdigit() or int(version) == 0:
        raise InvalidArgument(f"model version must be a positive integer, got {version!r}")
    return int(version)


def _validate_rows(rows: Any) -> np.ndarray:
    try:
        array = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgument("rows must be numbers convertible to FP32") from None
    if array.ndim != 2:
        raise InvalidArgument(
            f"rows must be 2-D [batch, n_features], got shape {list(array.shape)}"
        )
    if array.shape[0] == 0:
        raise InvalidArgument("empty batch: send at least one row")
    if array.shape[1] == 0:
        raise InvalidArgument("rows have no features: shape must be [batch, n_features]")
    if not np.isfinite(array).all():
        raise InvalidArgument("rows contain NaN or infinite values; send finite feature values")
    return np.ascontiguousarray(array)


def _shape_of(
    metadata: ModelMetadata, n_columns: int
) -> tuple[str, int, tuple[tuple[str, int], ...] | None]:
    """(input name, n_features, output layout) from a model's metadata."""
    input_name, n_features = tensors.INPUT_NAME, n_columns
    if metadata.inputs:
        spec = metadata.inputs[0]
        input_name = spec.name or input_name
        if len(spec.shape) == 2 and spec.shape[1] > 0:
            n_features = spec.shape[1]
    layout: list[tuple[str, int]] = []
    for spec in metadata.outputs:
        if spec.datatype != tensors.FP32 or len(spec.shape) != 2 or spec.shape[1] <= 0:
            return input_name, n_features, None
        layout.append((spec.name, spec.shape[1]))
    return input_name, n_features, tuple(layout) if layout else None


def _dedupe(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(index of each distinct key's first occurrence, each key's index among the distinct)."""
    slot: dict[bytes, int] = {}
    first: list[int] = []
    inverse = np.empty(len(keys), dtype=np.int64)
    for position, key in enumerate(keys):
        index = slot.get(key)
        if index is None:
            index = slot[key] = len(first)
            first.append(position)
        inverse[position] = index
    return np.asarray(first, dtype=np.int64), inverse


def _layout_of(outputs: dict[str, np.ndarray]) -> tuple[tuple[str, int], ...]:
    return tuple((name, array.shape[1]) for name, array in outputs.items())


def _encode(outputs: dict[str, np.ndarray], layout: tuple[tuple[str, int], ...]) -> list[bytes]:
    """One cache value per row: its outputs as little-endian float32, in layout order."""
    table = np.concatenate([outputs[name].astype("<f4") for name, _ in layout], axis=1)
    return [row.tobytes() for row in table]


def _decode(values: list[bytes], layout: tuple[tuple[str, int], ...]) -> dict[str, np.ndarray]:
    width = sum(w for _, w in layout)
    table = np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), width)
    decoded: dict[str, np.ndarray] = {}
    column = 0
    for name, w in layout:
        decoded[name] = table[:, column : column + w].astype(np.float32)
        column += w
    return decoded
