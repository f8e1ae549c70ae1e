"""The job manager: validates a training request, runs it on a background thread, tracks its
status for GetJob/WatchJob, supports cancel, and registers + promotes the trained model.

Data comes through a `DataAccess`: `FlightData` reads the data plane (describe the dataset,
plan its shards cache-first, read each endpoint); tests can pass an in-memory one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.flight as flight
import torch

from onehop.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    OnehopError,
    Unavailable,
    from_flight_error,
)
from onehop.keys import validate_name
from protos.onehop.v1 import data_pb2
from trainer_service.model import ModelSpec, Preprocessing, select_device
from trainer_service.registry import Registry
from trainer_service.training import (
    Hyperparameters,
    Progress,
    ShardSource,
    TrainingCancelled,
    TrainingFailed,
    build_model,
    total_steps,
    train,
)

log = logging.getLogger(__name__)

MAX_JOBS_KEPT = 1000
# Arrow type names (str(pa.DataType)) a feature or the target may have.
NUMERIC_TYPES = frozenset(
    {"bool", "halffloat", "float", "double", "float16", "float32", "float64"}
    | {f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)}
)


# --- plain types ---------------------------------------------------------------------------


class JobState(enum.IntEnum):
    """Values match onehop.v1.JobState."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRequest:
    dataset: str
    target: str
    model_name: str
    dataset_version: int = 0
    features: tuple[str, ...] = ()
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    val_split: float = 0.0
    seed: int = 0


@dataclass
class JobStatus:
    job_id: str
    state: JobState
    model_name: str
    dataset: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    samples_per_second: float = 0.0
    data_wait_share: float = 0.0
    elapsed: float = 0.0
    message: str = ""
    model_version: int = 0

    def copy(self) -> JobStatus:
        return dataclasses.replace(self, metrics=dict(self.metrics))


@dataclass(frozen=True)
class ColumnSummary:
    name: str
    type: str = ""
    count: int = 0
    nulls: int = 0
    mean: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class DatasetDescription:
    name: str
    version: int
    rows: int
    shard_rows: dict[int, int]
    columns: tuple[ColumnSummary, ...]


class DataAccess(Protocol):
    def describe(self, dataset: str, version: int) -> DatasetDescription: ...

    def open(
        self, dataset: DatasetDescription, columns: Sequence[str], target: str
    ) -> contextlib.AbstractContextManager[list[ShardSource]]:
        """The shards of `dataset`, projected to `columns`, features standardised with the
        version's statistics and `target` passed through; readers valid inside the block."""
        ...


# --- the data plane ------------------------------------------------------------------------


class FlightData:
    """`DataAccess` over `onehop.dataplane.DataClient` (cache-first endpoints)."""

    def __init__(self, client_factory: Callable[[], Any]):
        self._client_factory = client_factory

    def describe(self, dataset: str, version: int) -> DatasetDescription:
        client = self._client_factory()
        try:
            with _flight_errors():
                info = client.describe(dataset, version)
        finally:
            client.close()
        return DatasetDescription(
            name=info.name,
            version=info.version,
            rows=info.rows,
            shard_rows={s.shard: s.rows for s in info.shards},
            columns=tuple(
                ColumnSummary(c.name, c.type, c.count, c.nulls, c.mean, c.std, c.min, c.max)
                for c in info.columns
            ),
        )

    @contextlib.contextmanager
    def open(
        self, dataset: DatasetDescription, columns: Sequence[str], target: str
    ) -> Iterator[list[ShardSource]]:
        client = self._client_factory()
        try:
            request = data_pb2.DataRequest(
                dataset=dataset.name,
                version=dataset.version,
                preprocess=data_pb2.Preprocessing(
                    scaling=data_pb2.SCALING_STANDARD, passthrough=[target]
                ),
                columns=list(columns),
                shuffle=False,
            )
            with _flight_errors():
                info = client.plan(request)
            sources = []
            for endpoint in info.endpoints:
                shard = data_pb2.ShardTicket.FromString(endpoint.ticket.ticket).shard
                sources.append(
                    ShardSource(
                        shard=shard,
                        rows=dataset.shard_rows.get(shard, 0),
                        read=functools.partial(_read, client, endpoint),
                    )
                )
            yield sources
        finally:
            client.close()


def _read(client: Any, endpoint: flight.FlightEndpoint) -> pa.Table:
    with _flight_errors():
        return client.read(endpoint)


@contextlib.contextmanager
def _flight_errors() -> Iterator[None]:
    """Flight client failures as the error table's domain errors."""
    try:
        yield
    except OnehopError:
        raise
    except (flight.FlightError, pa.ArrowException) as exc:
        raise from_flight_error(exc) from None
    except OSError as exc:
        raise Unavailable(f"data plane unreachable: {exc.strerror or exc}") from None


# --- validation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    request: JobRequest
    dataset: DatasetDescription
    spec: ModelSpec
    hp: Hyperparameters
    preprocessing: Preprocessing


def _validate_static(request: JobRequest) -> tuple[ModelSpec, Hyperparameters]:
    validate_name("model", request.model_name)
    validate_name("dataset", request.dataset)
    if request.dataset_version < 0:
        raise InvalidArgument("dataset_version must not be negative")
    if not request.target:
        raise InvalidArgument("target: name the column to predict")
    spec = ModelSpec.resolve(request.hidden, request.dropout)
    hp = Hyperparameters.resolve(
        request.epochs, request.batch_size, request.lr, request.val_split, request.seed
    )
    return spec, hp


def _numeric(column: ColumnSummary) -> bool:
    # An empty type means the data plane did not say; let the shard read decide.
    return column.type in NUMERIC_TYPES or not column.type


def _resolve_columns(request: JobRequest, dataset: DatasetDescription) -> Preprocessing:
    columns = {c.name: c for c in dataset.columns}
    where = f"dataset {dataset.name!r} version {dataset.version}"
    target = columns.get(request.target)
    if target is None:
        raise InvalidArgument(
            f"target: {where} has no column {request.target!r}; columns: {sorted(columns)}"
        )
    if not _numeric(target):
        raise InvalidArgument(f"target: column {target.name!r} is {target.type}, not binary 0/1")
    if target.nulls:
        raise InvalidArgument(f"target: column {target.name!r} has {target.nulls} missing values")
    if target.count and not ({target.min, target.max} <= {0.0, 1.0}):
        raise InvalidArgument(
            f"target: column {target.name!r} must be binary (0 or 1); "
            f"its values range over [{target.min:g}, {target.max:g}]"
        )
    if request.features:
        features = list(request.features)
        if len(set(features)) != len(features):
            raise InvalidArgument("features: a column is listed twice")
        for name in features:
            if name == request.target:
                raise InvalidArgument(f"features: {name!r} is the target")
            if name not in columns:
                raise InvalidArgument(f"features: {where} has no column {name!r}")
            if not _numeric(columns[name]):
                raise InvalidArgument(
                    f"features: column {name!r} is {columns[name].type}, not numeric"
                )
    else:
        features = [c.name for c in dataset.columns if c.name != request.target and _numeric(c)]
        if not features:
            raise InvalidArgument(f"features: {where} has no numeric column besides the target")
    for name in features:
        if columns[name].nulls:
            raise InvalidArgument(
                f"features: column {name!r} has {columns[name].nulls} missing values"
            )
    return Preprocessing(
        features=tuple(features),
        means=tuple(float(columns[f].mean) for f in features),
        stds=tuple(float(columns[f].std) for f in features),
    )


# --- the manager ---------------------------------------------------------------------------


@dataclass
class _Job:
    status: JobStatus
    plan: _Plan
    cancel: threading.Event = field(default_factory=threading.Event)
    watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[JobStatus]]] = field(
        default_factory=list
    )


class JobManager:
    """Training jobs, one at a time on a worker thread, the rest queued in order."""

    def __init__(
        self,
        registry: Registry,
        data: DataAccess,
        device: torch.device | None = None,
        progress_interval: float = 0.2,
    ):
        self._registry = registry
        self._data = data
        self._device = device or select_device()
        self._progress_interval = progress_interval
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="trainer-jobs", daemon=True)
        self._worker.start()

    # --- API -----------------------------------------------------------------------------

    def start(self, request: JobRequest) -> str:
        """Validate (InvalidArgument naming the field, NotFound for an unknown dataset) and
        queue the job; returns its id. Blocks on the data plane's describe: call it off the
        event loop."""
        spec, hp = _validate_static(request)
        dataset = self._data.describe(request.dataset, request.dataset_version)
        preprocessing = _resolve_columns(request, dataset)
        plan = _Plan(request, dataset, spec, hp, preprocessing)
        job_id = uuid.uuid4().hex[:16]
        job = _Job(
            status=JobStatus(
                job_id=job_id,
                state=JobState.PENDING,
                model_name=request.model_name,
                dataset=dataset.name,
                epochs=hp.epochs,
            ),
            plan=plan,
        )
        with self._lock:
            if self._closed:
                raise Unavailable("the trainer is shutting down")
            self._jobs[job_id] = job
            self._forget_old()
        self._queue.put(job)
        log.info(
            "job %s queued: %s on %s@%d", job_id, request.model_name, dataset.name, dataset.version
        )
        return job_id

    def get(self, job_id: str) -> JobStatus:
        with self._lock:
            return self._job(job_id).status.copy()

    def list(self) -> list[JobStatus]:
        with self._lock:
            return [job.status.copy() for job in self._jobs.values()]

    def cancel(self, job_id: str) -> JobStatus:
        """Stop a job: a queued one is cancelled now, a running one between two batches."""
        with self._lock:
            job = self._job(job_id)
            job.cancel.set()
            if job.status.state is JobState.PENDING:
                self._set(job, state=JobState.CANCELLED, message="cancelled before it started")
            elif job.status.state is JobState.RUNNING:
                self._set(job, message="cancelling")
            return job.status.copy()

    async def watch(self, job_id: str) -> AsyncIterator[JobStatus]:
        """The job's status now, then on every change (progress at most every ~0.2 s, every
        state change), until it is terminal."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[JobStatus] = asyncio.Queue()
        with self._lock:
            job = self._job(job_id)
            status = job.status.copy()
            job.watchers.append((loop, updates))
        try:
            yield status
            while not status.state.terminal:
                update = await updates.get()
                if update != status:
                    status = update
                    yield status
        finally:
            with self._lock, contextlib.suppress(ValueError):
                job.watchers.remove((loop, updates))

    def close(self, timeout: float = 10.0) -> None:
        """Cancel queued and running jobs and stop the worker."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                job.cancel.set()
                if job.status.state is JobState.PENDING:
                    self._set(job, state=JobState.CANCELLED, message="the trainer shut down")
        self._queue.put(None)
        self._worker.join(timeout)

    # --- internals -----------------------------------------------------------------------

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def _forget_old(self) -> None:
        """Keep the newest MAX_JOBS_KEPT jobs (finished ones go first)."""
        excess = len(self._jobs) - MAX_JOBS_KEPT
        for job_id in [j for j, job in self._jobs.items() if job.status.state.terminal][:excess]:
            del self._jobs[job_id]

    def _set(self, job: _Job, **changes: Any) -> None:
        """Apply changes and publish a snapshot to the watchers (call with the lock held)."""
        for name, value in changes.items():
            setattr(job.status, name, value)
        snapshot = job.status.copy()
        alive = []
        for loop, updates in job.watchers:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, snapshot)
                alive.append((loop, updates))
            except RuntimeError:  # the watcher's event loop is closed
                continue
        job.watchers[:] = alive

    def _update(self, job: _Job, **changes: Any) -> None:
        with self._lock:
            self._set(job, **changes)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue
            self._run(job)

    def _run(self, job: _Job) -> None:
        plan = job.plan
        request = plan.request
        self._update(job, state=JobState.RUNNING, message="")
        started = time.perf_counter()
        try:
            columns = [*plan.preprocessing.features, request.target]
            with self._data.open(plan.dataset, columns, request.target) as shards:
                self._update(job, total_steps=total_steps(shards, plan.hp))
                model = build_model(plan.spec, plan.preprocessing, plan.hp.seed)
                result = train(
                    model,
                    shards,
                    request.target,
                    plan.hp,
                    device=self._device,
                    on_progress=functools.partial(self._on_progress, job),
                    should_stop=job.cancel.is_set,
                    progress_interval=self._progress_interval,
                )
            record = self._registry.register(
                request.model_name,
                model,
                target=request.target,
                dataset=plan.dataset.name,
                dataset_version=plan.dataset.version,
                metrics={k: v for k, v in result.metrics.items() if math.isfinite(v)},
            )
        except TrainingCancelled as exc:
            self._finish(job, started, JobState.CANCELLED, str(exc))
        except TrainingFailed as exc:
            self._finish(job, started, JobState.FAILED, str(exc))
        except OnehopError as exc:
            self._finish(job, started, JobState.FAILED, exc.message)
        except Exception as exc:
            self._finish(job, started, JobState.FAILED, Internal.wrap(exc).message)
        else:
            self._finish(
                job,
                started,
                JobState.SUCCEEDED,
                f"registered {record.name} version {record.version}",
                model_version=record.version,
                metrics=dict(record.metrics),
                loss=result.loss,
                samples_per_second=result.samples_per_second,
                data_wait_share=result.data_wait_share,
            )

    def _finish(
        self, job: _Job, started: float, state: JobState, message: str, **changes: Any
    ) -> None:
        log.info("job %s %s: %s", job.status.job_id, state.name.lower(), message)
        self._update(
            job, state=state, message=message, elapsed=time.perf_counter() - started, **changes
        )

    def _on_progress(self, job: _Job, progress: Progress) -> None:
        self._update(
            job,
            epoch=progress.epoch,
            epochs=progress.epochs,
            step=progress.step,
            total_steps=progress.total_steps,
            loss=progress.loss,
            metrics=progress.metrics,
            samples_per_second=progress.samples_per_second,
            data_wait_share=progress.data_wait_share,
            elapsed=progress.elapsed,
        )
