"""Inference core: registry-backed model loading, prediction and dynamic batching; no gRPC.

`Predictor.predict` is synchronous torch work; async callers go through `Batcher`, which
stacks concurrent requests for the same model into one forward pass (Triton's dynamic
batcher: a maximum batch size, a maximum queue delay, a bounded queue) and splits the
answers back.

Version 0 is the registry's serving version, looked up in memory on the request path.
`Predictor.refresh` (the server runs it every few seconds) re-reads the registry, which other
processes may write (a training Job, a trainer with role "train"): a newly promoted version
is loaded and warmed there, off the request path, then swapped in; the requests in flight
finish on the old one and none is dropped. A model or version the predictor has not seen is
looked up on disk when first asked for, and a register or promotion through this process's
own Registry is followed at once. If a promoted version cannot be loaded, the last good
serving version keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from onehop.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    OnehopError,
    ResourceExhausted,
    Unavailable,
)
from trainer_service.model import ModelSpec, TabularModel, select_device
from trainer_service.registry import ModelRecord, Registry

log = logging.getLogger(__name__)

# A version that failed to load is not retried on every request.
_RETRY_FAILED_AFTER_SECONDS = 30.0


@dataclass(frozen=True)
class LoadedModel:
    record: ModelRecord
    module: TabularModel

    @property
    def identity(self) -> tuple[int, str]:
        return self.record.version, self.record.weights_digest

    @property
    def n_features(self) -> int:
        return len(self.record.features)

    @property
    def output(self) -> tuple[str, int]:
        """The OIP output tensor: its name and width."""
        return output_tensor(self.record.spec)


def output_tensor(spec: ModelSpec) -> tuple[str, int]:
    """The OIP output tensor of a model with `spec`: its name and width."""
    return ("prediction" if spec.task == "regression" else "probability", spec.outputs)


class Predictor:
    """Loads registered versions onto one device (eval mode, LRU-bounded) and runs them."""

    def __init__(self, registry: Registry, device: torch.device | None = None, max_loaded: int = 8):
        self.registry = registry
        self.device = device or select_device()
        self._max_loaded = max_loaded
        self._loaded: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        # Per model: the version that answers version 0, and the registry generation it
        # was read at. Replaced whole (one dict store), so a reader sees old or new.
        self._serving: dict[str, tuple[LoadedModel, int]] = {}
        self._failed: dict[tuple[str, int], tuple[float, OnehopError]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The loaded model for `name`; version 0 = the serving version.

        NotFound for an unknown model or version; FailedPrecondition for a version whose files
        are corrupt (unless version 0 was asked and an earlier serving version is loaded).
        """
        if version:
            return self._load(name, version)
        serving = self._serving.get(name)
        if serving is not None and serving[1] == self.registry.generation:
            return serving[0]
        return self._follow(name)

    def refresh(self) -> None:
        """Re-read the registry: load and warm each model's serving version if it changed
        (or the model is new), then swap it in. A version that does not load was logged
        when it was tried; the old one keeps serving."""
        for name in self.registry.names():
            serving = self._serving.get(name)
            try:
                version = self.registry.serving_version(name)
                if serving is None or serving[0].record.version != version:
                    self._follow(name)
            except FailedPrecondition:
                continue
            except OnehopError as exc:  # e.g. removed meanwhile
                log.warning("model %s: %s", name, exc.message)

    def _follow(self, name: str) -> LoadedModel:
        """The serving version of `name` as the registry names it now, loaded."""
        generation = self.registry.generation
        version = self.registry.serving_version(name)
        previous = self._serving.get(name)
        try:
            model = self._load(name, version)
        except FailedPrecondition:
            if previous is None:
                raise
            model = previous[0]
        if previous is None or previous[0] is not model:
            log.info("model %s: serving version %d", name, model.record.version)
        self._serving[name] = (model, generation)
        return model

    def _load(self, name: str, version: int) -> LoadedModel:
        """Version `version` (> 0) loaded and warmed. Loading happens outside the lock, so a
        version being loaded does not hold up requests for those already loaded."""
        key = (name, version)
        with self._lock:
            model = self._loaded.get(key)
            if model is not None:
                self._loaded.move_to_end(key)
                return model
            failed = self._failed.get(key)
            if failed and time.monotonic() - failed[0] < _RETRY_FAILED_AFTER_SECONDS:
                raise failed[1]
        try:
            record = self.registry.record(name, version)
            model = LoadedModel(record, self.registry.load_model(record, self.device))
        except FailedPrecondition as exc:
            with self._lock:
                self._failed[key] = (time.monotonic(), exc)
            log.warning("model %s version %d does not load: %s", name, version, exc.message)
            raise
        _warm(model, self.device)
        with self._lock:
            self._failed.pop(key, None)
            model = self._loaded.setdefault(key, model)  # a concurrent load may have won
            self._loaded.move_to_end(key)
            while len(self._loaded) > self._max_loaded:
                self._loaded.popitem(last=False)
        log.info("loaded model %s version %d on %s", name, version, self.device)
        return model

    def predict(self, name: str, version: int, x: np.ndarray) -> tuple[np.ndarray, int, str]:
        """The model's answers float32 [n, k] for RAW features `x` float32 [n, n_features]
        (probabilities, or values for regression), with the version that answered and its
        weights digest."""
        out, model = self.infer(name, version, x)
        return out, *model.identity

    def infer(self, name: str, version: int, x: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        """`predict` that returns the loaded model that answered."""
        model = self.get(name, version)
        return self.forward(model, [check_input(model, x)])[0], model

    def forward(self, model: LoadedModel, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """One forward pass over the inputs stacked, split back per input."""
        sizes = [len(x) for x in inputs]
        stacked = np.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        if not stacked.flags.writeable:  # a view of request bytes; torch wants its own
            stacked = stacked.copy()
        if len(stacked) == 0:
            out = np.empty((0, model.output[1]), dtype=np.float32)
        else:
            with torch.inference_mode():
                out = model.module.predict(torch.from_numpy(stacked).to(self.device)).cpu().numpy()
        return np.split(out, np.cumsum(sizes)[:-1]) if len(inputs) > 1 else [out]

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()
            self._serving.clear()


def _warm(model: LoadedModel, device: torch.device) -> None:
    """One forward pass before a version serves: the first request must not pay for lazy
    initialisation (allocator, kernels)."""
    with torch.inference_mode():
        model.module.predict(torch.zeros((1, model.n_features), device=device))


def check_input(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    """`x` as contiguous float32 [n, n_features] of finite values, or InvalidArgument."""
    n = model.n_features
    if x.ndim != 2 or x.shape[1] != n:
        raise InvalidArgument(f"expected [-1, {n}] got {list(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidArgument("input contains NaN or infinite values; send raw feature values")
    return x


# --- dynamic batching ----------------------------------------------------------------------


@dataclass(frozen=True)
class BatchingConfig:
    """`max_batch_size` rows per forward pass (1 = batching off), `max_queue_delay` seconds
    a batch waits for more requests once its first one arrived, `max_queue` requests
    waiting per model before new ones are refused (RESOURCE_EXHAUSTED), `instances` batches
    of one model computing at once (Triton's instance count; more than one helps where
    forward passes can run side by side, e.g. spare cores; on 2 busy cores one batched as
    well or better)."""

    max_batch_size: int = 64
    max_queue_delay: float = 0.002
    max_queue: int = 1024
    instances: int = 1


@dataclass
class _Request:
    x: np.ndarray
    arrived: float
    deadline: float | None
    future: asyncio.Future[tuple[np.ndarray, LoadedModel]]

    @property
    def rows(self) -> int:
        return len(self.x)


@dataclass
class _Lane:
    """The queue of one (model, requested version) and its batching task. `full` is set
    once the queued rows fill a batch, so a batch waits on one timer, not one per request."""

    pending: deque[_Request] = field(default_factory=deque)
    rows: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    expired: int = 0
    rejected: int = 0


class Batcher:
    """Stacks concurrent requests for one model into one forward pass (asyncio, one task per
    model lane; forward passes run on worker threads, up to `instances` at once, while the
    next batch gathers).

    A request waiting past its deadline is dropped before it is computed
    (DEADLINE_EXCEEDED); a full lane refuses new requests (RESOURCE_EXHAUSTED).
    """

    def __init__(self, predictor: Predictor, config: BatchingConfig | None = None):
        self.predictor = predictor
        self.config = config or BatchingConfig()
        self.stats = BatchStats()
        self._lanes: dict[tuple[str, int], _Lane] = {}

    async def predict(
        self, name: str, version: int, x: np.ndarray, timeout: float | None = None
    ) -> tuple[np.ndarray, LoadedModel]:
        """The answers for `x` and the model version that computed them; `timeout` seconds
        left to the caller (None = no deadline)."""
        if self.config.max_batch_size <= 1:
            return await asyncio.to_thread(self.predictor.infer, name, version, x)
        loop = asyncio.get_running_loop()
        lane = self._lanes.get((name, version))
        if lane is None:
            lane = self._lanes[(name, version)] = _Lane()
            lane.task = loop.create_task(self._serve(name, version, lane))
        if len(lane.pending) >= self.config.max_queue:
            self.stats.rejected += 1
            raise ResourceExhausted(
                f"model {name!r}: {len(lane.pending)} requests already queued; retry later"
            )
        now = loop.time()
        request = _Request(x, now, None if timeout is None else now + timeout, loop.create_future())
        lane.pending.append(request)
        lane.rows += request.rows
        lane.wake.set()
        if lane.rows >= self.config.max_batch_size:
            lane.full.set()
        return await request.future

    async def _serve(self, name: str, version: int, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        limit = self.config.max_batch_size
        instances = asyncio.Semaphore(self.config.instances)
        while True:
            while not lane.pending:
                lane.wake.clear()
                await lane.wake.wait()
            # Requests keep gathering while every instance computes.
            await instances.acquire()
            # Wait for a full batch, at most max_queue_delay after the oldest request came.
            left = lane.pending[0].arrived + self.config.max_queue_delay - loop.time()
            if lane.rows < limit and left > 0:
                lane.full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lane.full.wait(), left)
            batch: list[_Request] = []
            rows = 0
            while lane.pending and (not batch or rows + lane.pending[0].rows <= limit):
                request = lane.pending.popleft()
                lane.rows -= request.rows
                batch.append(request)
                rows += request.rows
            now = loop.time()
            live = []
            for request in batch:
                if request.future.done():  # the caller went away
                    continue
                if request.deadline is not None and request.deadline <= now:
                    self.stats.expired += 1
                    request.future.set_exception(
                        DeadlineExceeded("the request expired in the batching queue")
                    )
                    continue
                live.append(request)
            if not live:
                instances.release()
                continue
            task = loop.create_task(self._run(name, version, live))
            lane.running.add(task)
            task.add_done_callback(lane.running.discard)
            task.add_done_callback(lambda _: instances.release())

    async def _run(self, name: str, version: int, batch: list[_Request]) -> None:
        try:
            results = await asyncio.to_thread(self._compute, name, version, batch)
        except Exception as exc:  # the model could not be resolved: every request fails
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        self.stats.batches += 1
        for request, result in zip(batch, results, strict=True):
            if request.future.done():
                continue
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                self.stats.requests += 1
                self.stats.rows += request.rows
                request.future.set_result(result)

    def _compute(
        self, name: str, version: int, batch: list[_Request]
    ) -> list[tuple[np.ndarray, LoadedModel] | OnehopError]:
        """Worker thread: resolve the version once, check each input, one forward pass."""
        model = self.predictor.get(name, version)
        results: list[tuple[np.ndarray, LoadedModel] | OnehopError] = []
        inputs, slots = [], []
        for request in batch:
            try:
                inputs.append(check_input(model, request.x))
                slots.append(len(results))
                results.append(InvalidArgument("unreachable"))
            except InvalidArgument as exc:
                results.append(exc)
        if inputs:
            for slot, out in zip(slots, self.predictor.forward(model, inputs), strict=True):
                results[slot] = (out, model)
        return results

    async def close(self) -> None:
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
            for request in lane.pending:
                if not request.future.done():
                    request.future.set_exception(Unavailable("the trainer is shutting down"))
        # Batches already computing finish and answer.
        running = [task for lane in self._lanes.values() for task in lane.running]
        await asyncio.gather(*running, return_exceptions=True)
        self._lanes.clear()
        stats = self.stats
        if stats.batches:
            log.info(
                "batcher: %d requests, %d rows in %d batches (%.1f rows each); "
                "%d expired, %d refused",
                stats.requests,
                stats.rows,
                stats.batches,
                stats.rows / stats.batches,
                stats.expired,
                stats.rejected,
            )
