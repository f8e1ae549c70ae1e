"""The inference router: the predict path of DESIGN §2, shared by the gRPC and HTTP edges.

Per request: resolve the model's serving version and weights digest (cached for
`model_info_ttl_seconds`), key every row by (model, digest, row bytes), look all keys up in
one batch — from the local LMDB replica's memory map (0 hops) or the cache service (1 hop) —
send only the missing rows to the trainer in one call (1 hop), merge in order, and write the
new rows back to the cache after the response, off the critical path and droppable.
"""

from __future__ import annotations

import asyncio
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

from gateway import tensors
from gateway.tensors import ModelMetadata
from onehop.errors import Internal, InvalidArgument, NotFound, from_rpc_error
from onehop.keys import prediction_keys, validate_name
from onehop.settings import Settings
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, trainer_pb2, trainer_pb2_grpc

__all__ = ["InferResult", "InferenceRouter", "ModelMetadata"]

log = logging.getLogger(__name__)

# The response parameter in which the trainer names the weights that computed the rows.
DIGEST_PARAMETER = "onehop-weights-digest"
# Deadlines for calls that carry no client deadline of their own.
_CONTROL_TIMEOUT_S = 10.0
_INFER_TIMEOUT_S = 60.0
_WRITEBACK_TIMEOUT_S = 5.0
# How long close() lets pending write-backs finish before cancelling them.
_CLOSE_WAIT_S = 1.0
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

    async def do(self, key: Hashable, call: Callable[[], Awaitable[_T]]) -> _T:
        future = self._calls.get(key)
        if future is None:
            future = asyncio.ensure_future(call())
            self._calls[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(future)

    def _forget(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._calls.get(key) is done:
            del self._calls[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so a call nobody awaits any more is not logged


class InferenceRouter:
    """Routes inference between the prediction cache and the trainer; no gRPC in its API.

    The channels belong to the caller; `close()` settles pending write-backs and closes the
    local replica reader.
    """

    def __init__(
        self, settings: Settings, trainer: grpc.aio.Channel, cache: grpc.aio.Channel | None
    ):
        self.settings = settings
        self._trainer = trainer_pb2_grpc.TrainerStub(trainer)
        self._inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(trainer)
        self._cache = cache_pb2_grpc.CacheStub(cache) if cache is not None else None
        self._cache_path = Path(settings.cache_path) if settings.cache_path else None
        self._reader: Any = None
        self._reader_retry_at = 0.0
        self._reader_lock = asyncio.Lock()
        self._models: dict[tuple[str, int], tuple[float, _Model]] = {}
        # Output layout and input shape per weights digest: fixed by the weights, so kept.
        self._shapes: dict[
            tuple[str, str], tuple[str, int, tuple[tuple[str, int], ...] | None]
        ] = {}
        self._flights = _SingleFlight()
        self._pending: set[asyncio.Task[None]] = set()
        self.writebacks_dropped = 0

    # --- the predict path ---------------------------------------------------------------

    async def infer(
        self, model: str, version: str, rows: np.ndarray, timeout: float | None = None
    ) -> InferResult:
        """Predictions for `rows` ([n, n_features]) from `model` at `version` ("" = serving).

        `timeout` bounds the trainer call (the client's remaining deadline)."""
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self._infer(model, version, rows, timeout)
            outcome = result.cache
            return result
        finally:
            REQUESTS.labels(outcome).inc()
            LATENCY.labels(outcome).observe(time.perf_counter() - started)

    async def _infer(
        self, model: str, version: str, rows: np.ndarray, timeout: float | None
    ) -> InferResult:
        validate_name("model", model)
        requested = _parse_version(version)
        rows = _validate_rows(rows)
        resolved, hops = await self._resolve(model, requested)
        if resolved.n_features and rows.shape[1] != resolved.n_features:
            raise InvalidArgument(
                f"model {model!r} version {resolved.version} takes {resolved.n_features} "
                f"features per row (shape [-1, {resolved.n_features}]); got {rows.shape[1]}"
            )
        keys = prediction_keys(model, resolved.digest, rows)

        values: list[bytes | None] | None = None
        if resolved.layout is not None:
            values, lookup_hops = await self._lookup(keys)
            hops += lookup_hops
        hit = np.zeros(len(keys), dtype=bool)
        if values is not None:
            hit[:] = [v is not None and len(v) == resolved.row_bytes for v in values]
        n_hits = int(hit.sum())
        ROWS.labels("hit").inc(n_hits)
        ROWS.labels("miss").inc(len(keys) - n_hits)

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
            computed, digest = await self._compute(resolved, rows[unique], unique_keys, timeout)
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
            if values is not None:
                self._schedule_writeback(resolved, digest, rows[unique], unique_keys, computed)

        if values is None:
            cache = "bypass"
        elif n_hits == len(keys):
            cache = "hit"
        elif n_hits:
            cache = "partial"
        else:
            cache = "miss"
        return InferResult(outputs=outputs, model_version=resolved.version, cache=cache, hops=hops)

    async def _resolve(self, model: str, version: int) -> tuple[_Model, int]:
        """The model's resolved version, digest and shapes, and the hops spent learning them."""
        cached = self._models.get((model, version))
        if (
            cached is not None
            and time.monotonic() - cached[0] < self.settings.model_info_ttl_seconds
        ):
            return cached[1], 0
        return await self._flights.do(
            ("resolve", model, version), lambda: self._fetch(model, version)
        )

    async def _fetch(self, model: str, version: int) -> tuple[_Model, int]:
        try:
            info = await self._trainer.GetModel(
                trainer_pb2.GetModelRequest(name=model, version=version),
                timeout=_CONTROL_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        hops = 1
        resolved_version = str(info.version)
        shape = self._shapes.get((model, info.weights_digest))
        if shape is None:
            metadata = await self.model_metadata(model, resolved_version)
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

    async def _lookup(self, keys: list[bytes]) -> tuple[list[bytes | None] | None, int]:
        """Every key in one batch: (values or None per key, hops). None for the whole list
        means the cache could not be asked (down, slow, absent): a bypass, not an error."""
        reader = await self._local_reader()
        if reader is not None:
            try:
                values = await asyncio.wait_for(
                    asyncio.to_thread(reader.get_many, keys), self.settings.cache_timeout_seconds
                )
                if len(values) == len(keys):
                    return list(values), 0
                log.warning("local cache answered %d of %d keys; bypassing", len(values), len(keys))
                return None, 0
            # A failing local replica is a miss, never a failed request.
            except Exception:
                log.warning("local cache read failed; bypassing the cache", exc_info=True)
                return None, 0
        if self._cache is None:
            return None, 0
        try:
            reply = await self._cache.BatchGet(
                cache_pb2.BatchGetRequest(keys=keys), timeout=self.settings.cache_timeout_seconds
            )
        except grpc.RpcError as exc:
            log.debug("cache lookup failed (%s); bypassing the cache", exc.code())
            return None, 1
        if len(reply.found) != len(keys) or len(reply.values) != len(keys):
            log.warning(
                "cache answered %d of %d keys; bypassing the cache", len(reply.found), len(keys)
            )
            return None, 1
        return [
            value if found else None for found, value in zip(reply.found, reply.values, strict=True)
        ], 1

    async def _local_reader(self) -> Any:
        """The LMDB replica on this host, opened read-only once its data file exists."""
        if self._reader is not None or self._cache_path is None:
            return self._reader
        if time.monotonic() < self._reader_retry_at:
            return None
        async with self._reader_lock:
            if self._reader is None and (self._cache_path / "data.mdb").exists():
                try:
                    from cache_service.store import CacheReader

                    self._reader = await asyncio.to_thread(CacheReader, self._cache_path)
                    log.info("reading prediction hits from the local replica %s", self._cache_path)
                except Exception:
                    log.warning(
                        "cannot open the local cache replica %s", self._cache_path, exc_info=True
                    )
                    self._reader_retry_at = time.monotonic() + _READER_RETRY_S
            elif self._reader is None:
                self._reader_retry_at = time.monotonic() + _READER_RETRY_S
        return self._reader

    async def _compute(
        self, model: _Model, rows: np.ndarray, keys: list[bytes], timeout: float | None
    ) -> tuple[dict[str, np.ndarray], str | None]:
        """One trainer call for the missing rows, shared by concurrent identical requests:
        (outputs, the weights digest the trainer says computed them)."""
        flight = hashlib.sha256(b"\n".join(keys)).digest()
        return await self._flights.do(
            ("infer", model.name, model.version, flight),
            lambda: self._call_model(model, rows, timeout),
        )

    async def _call_model(
        self, model: _Model, rows: np.ndarray, timeout: float | None
    ) -> tuple[dict[str, np.ndarray], str | None]:
        request = tensors.grpc_infer_request(model.name, model.version, rows, model.input_name)
        try:
            response = await self._inference.ModelInfer(
                request, timeout=timeout or _INFER_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            # The resolved version may be gone (deleted, re-registered): resolve afresh next time.
            self._models = {k: v for k, v in self._models.items() if k[0] != model.name}
            raise from_rpc_error(exc) from None
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
    ) -> None:
        if self._cache is None or model.layout is None:
            return
        if digest is None:
            WRITEBACKS.labels("skipped").inc()
            log.warning("trainer named no weights digest for %s; not caching its rows", model.name)
            return
        if _layout_of(outputs) != model.layout:
            WRITEBACKS.labels("skipped").inc()
            return
        if digest != model.digest:
            # The trainer served other weights than we resolved: key by what computed the rows.
            keys = prediction_keys(model.name, digest, rows)
            self._models = {k: v for k, v in self._models.items() if k[0] != model.name}
        if len(self._pending) >= self.settings.max_pending_writebacks:
            self.writebacks_dropped += 1
            WRITEBACKS.labels("dropped").inc()
            return
        values = _encode(outputs, model.layout)
        task = asyncio.create_task(self._write_back(keys, values))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write_back(self, keys: list[bytes], values: list[bytes]) -> None:
        assert self._cache is not None
        request = cache_pb2.BatchPutRequest(
            entries=[cache_pb2.Entry(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        )
        try:
            await self._cache.BatchPut(request, timeout=_WRITEBACK_TIMEOUT_S)
            WRITEBACKS.labels("written").inc()
        except grpc.RpcError as exc:
            WRITEBACKS.labels("failed").inc()
            log.debug("prediction write-back failed: %s", exc.code())

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for the pending write-backs; True when none is left."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
        return not self._pending

    async def close(self) -> None:
        await self.drain(_CLOSE_WAIT_S)
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await asyncio.to_thread(reader.close)

    # --- metadata and readiness, forwarded to the trainer --------------------------------

    async def model_metadata(self, model: str, version: str) -> ModelMetadata:
        validate_name("model", model)
        _parse_version(version)
        try:
            response = await self._inference.ModelMetadata(
                grpc_service_pb2.ModelMetadataRequest(name=model, version=version),
                timeout=_CONTROL_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return tensors.metadata_from_grpc(response)

    async def model_ready(self, model: str, version: str) -> bool:
        """Whether the trainer can serve the model now; unknown model → NotFound."""
        validate_name("model", model)
        _parse_version(version)
        try:
            response = await self._inference.ModelReady(
                grpc_service_pb2.ModelReadyRequest(name=model, version=version),
                timeout=_CONTROL_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, NotFound | InvalidArgument):
                raise error from None
            return False
        return response.ready

    async def server_ready(self) -> bool:
        """Ready when the trainer that computes the misses is."""
        try:
            response = await self._inference.ServerReady(
                grpc_service_pb2.ServerReadyRequest(), timeout=_CONTROL_TIMEOUT_S
            )
        except grpc.RpcError:
            return False
        return response.ready


# --- helpers ----------------------------------------------------------------------------


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
