"""The job manager: validates a training request, runs it on background worker threads
(`workers` jobs at a time, the rest queued in order), tracks its status and cost for
GetJob/WatchJob, supports cancel, checkpoints while it trains, and registers + promotes the
trained model.

Data comes through a `DataAccess`: `FlightData` reads the data plane (describe the dataset,
plan its shards cache-first, read each endpoint); tests can pass an in-memory one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
import logging
import math
import queue
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from trainer_service.checkpoint import CHECKPOINT, write_atomic
from trainer_service.model import ModelSpec, Preprocessing, describe_device, select_device
from trainer_service.registry import Registry
from trainer_service.sources import (
    ColumnSummary,
    DataAccess,
    DatasetDescription,
    ShardSource,
)
from trainer_service.training import (
    Checkpointing,
    Hyperparameters,
    Progress,
    TrainingCancelled,
    TrainingFailed,
    build_model,
    total_steps,
    train,
)

log = logging.getLogger(__name__)

MAX_JOBS_KEPT = 1000
# A job's request, beside its checkpoint: what recover() queues again after a restart.
JOB_FILE = "job.json"
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
    activation: str = ""
    task: str = ""
    epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    val_split: float = 0.0
    seed: int = 0
    optimizer: str = ""
    weight_decay: float = 0.0
    momentum: float = 0.0
    lr_schedule: str = ""
    warmup_steps: int = 0
    early_stopping_patience: int = 0
    checkpoint_every_steps: int = 0


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
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    bytes_read: int = 0
    device: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def copy(self) -> JobStatus:
        return dataclasses.replace(self, metrics=dict(self.metrics), history=list(self.history))


# --- the data plane ------------------------------------------------------------------------


class FlightData:
    """`DataAccess` over `onehop.dataplane.DataClient` (cache-first endpoints)."""

    def __init__(self, client_factory: Callable[[], Any]):
        self._client_factory = client_factory

    def describe(self, dataset: str, version: int) -> DatasetDescription:
        with self._client_factory() as client, _flight_errors():
            info = client.describe(dataset, version)
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
        with self._client_factory() as client:
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
class JobPlan:
    """A validated request: the dataset version it reads, the resolved model spec and
    hyperparameters, and the preprocessing (features in order, their statistics)."""

    request: JobRequest
    dataset: DatasetDescription
    spec: ModelSpec
    hp: Hyperparameters
    preprocessing: Preprocessing

    @property
    def columns(self) -> list[str]:
        return [*self.preprocessing.features, self.request.target]

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to resume this plan."""
        return {
            "dataset": self.dataset.name,
            "dataset_version": self.dataset.version,
            "target": self.request.target,
            "features": list(self.preprocessing.features),
            "spec": self.spec.to_json(),
            "hyperparameters": self.hp.to_json(),
        }


def make_plan(request: JobRequest, data: DataAccess) -> JobPlan:
    """Validate `request` (InvalidArgument naming the field) against the dataset it names
    (NotFound when unknown). Blocks on the data plane's describe."""
    validate_name("model", request.model_name)
    validate_name("dataset", request.dataset)
    if request.dataset_version < 0:
        raise InvalidArgument("dataset_version must not be negative")
    if not request.target:
        raise InvalidArgument("target: name the column to predict")
    # Everything that needs no data first, so a bad field fails before any network call.
    ModelSpec.resolve(request.hidden, request.dropout, request.activation, request.task, 2)
    hp = Hyperparameters.resolve(
        request.epochs,
        request.batch_size,
        request.lr,
        request.val_split,
        request.seed,
        optimizer=request.optimizer,
        weight_decay=request.weight_decay,
        momentum=request.momentum,
        lr_schedule=request.lr_schedule,
        warmup_steps=request.warmup_steps,
        early_stopping_patience=request.early_stopping_patience,
        checkpoint_every_steps=request.checkpoint_every_steps,
    )
    dataset = data.describe(request.dataset, request.dataset_version)
    preprocessing, classes = _resolve_columns(request, dataset)
    spec = ModelSpec.resolve(
        request.hidden, request.dropout, request.activation, request.task, classes
    )
    return JobPlan(request, dataset, spec, hp, preprocessing)


def _numeric(column: ColumnSummary) -> bool:
    # An empty type means the data plane did not say; let the shard read decide.
    return column.type in NUMERIC_TYPES or not column.type


def _check_target(request: JobRequest, target: ColumnSummary) -> int:
    """The target column fits the task; returns the number of classes (multiclass)."""
    task = request.task or "binary"
    if not _numeric(target):
        raise InvalidArgument(f"target: column {target.name!r} is {target.type}, not numeric")
    if target.nulls:
        raise InvalidArgument(f"target: column {target.name!r} has {target.nulls} missing values")
    if task == "binary" and target.count and not ({target.min, target.max} <= {0.0, 1.0}):
        raise InvalidArgument(
            f"target: column {target.name!r} must be binary (0 or 1) for task binary; "
            f"its values range over [{target.min:g}, {target.max:g}]"
        )
    if task == "multiclass":
        if target.min < 0 or target.max != math.floor(target.max):
            raise InvalidArgument(
                f"target: column {target.name!r} must hold class ids 0..K-1 for task "
                f"multiclass; its values range over [{target.min:g}, {target.max:g}]"
            )
        return int(target.max) + 1
    return 0


def _resolve_columns(request: JobRequest, dataset: DatasetDescription) -> tuple[Preprocessing, int]:
    columns = {c.name: c for c in dataset.columns}
    where = f"dataset {dataset.name!r} version {dataset.version}"
    target = columns.get(request.target)
    if target is None:
        raise InvalidArgument(
            f"target: {where} has no column {request.target!r}; columns: {sorted(columns)}"
        )
    classes = _check_target(request, target)
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
    regression = (request.task or "binary") == "regression"
    preprocessing = Preprocessing(
        features=tuple(features),
        means=tuple(float(columns[f].mean) for f in features),
        stds=tuple(float(columns[f].std) for f in features),
        target_mean=float(target.mean) if regression else 0.0,
        target_std=float(target.std) if regression else 1.0,
    )
    return preprocessing, classes


# --- the manager ---------------------------------------------------------------------------


@dataclass
class _Job:
    status: JobStatus
    plan: JobPlan
    cancel: threading.Event = field(default_factory=threading.Event)
    watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[JobStatus]]] = field(
        default_factory=list
    )
    # Recovered after a restart: continue from its checkpoint.
    resume: bool = False


class JobManager:
    """Training jobs on `workers` worker threads, the rest queued in order.

    With `checkpoint_dir`, each job keeps `{checkpoint_dir}/{job_id}/`: its request
    (`job.json`) and, while it runs, `checkpoint.safetensors`, written after every epoch (and
    every `checkpoint_every_steps`). The folder goes when the job ends, except when the
    trainer stops (shutdown or crash) first: `recover()` then queues the job again under
    the same id, to continue from its checkpoint.
    """

    def __init__(
        self,
        registry: Registry,
        data: DataAccess,
        device: torch.device | None = None,
        progress_interval: float = 0.2,
        workers: int = 1,
        checkpoint_dir: Path | None = None,
    ):
        self._registry = registry
        self._data = data
        self._device = device or select_device()
        self._device_name = describe_device(self._device)
        self._progress_interval = progress_interval
        self._checkpoint_dir = checkpoint_dir
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"trainer-jobs-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for worker in self._workers:
            worker.start()

    # --- API -----------------------------------------------------------------------------

    def start(self, request: JobRequest) -> str:
        """Validate (InvalidArgument naming the field, NotFound for an unknown dataset) and
        queue the job; returns its id. Blocks on the data plane's describe: call it off the
        event loop."""
        plan = make_plan(request, self._data)
        job_id = uuid.uuid4().hex[:16]
        if self._checkpoint_dir is not None:
            folder = self._checkpoint_dir / job_id
            folder.mkdir(parents=True, exist_ok=True)
            body = json.dumps(dataclasses.asdict(request)).encode()
            write_atomic(folder / JOB_FILE, lambda tmp: tmp.write_bytes(body))
        return self._queue_job(job_id, plan)

    def recover(self) -> list[str]:
        """Queue again, under their ids, the jobs a stopped trainer left unfinished; each
        continues from its last checkpoint. A job whose request no longer validates (its
        dataset is gone) is dropped with a warning. Blocks on the data plane."""
        if self._checkpoint_dir is None or not self._checkpoint_dir.is_dir():
            return []
        recovered = []
        files = sorted(self._checkpoint_dir.glob(f"*/{JOB_FILE}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            job_id = path.parent.name
            try:
                data = json.loads(path.read_text())
                for name in ("hidden", "features"):
                    data[name] = tuple(data[name])
                plan = make_plan(JobRequest(**data), self._data)
            except Unavailable as exc:  # the data plane is not up: try at the next start
                log.warning("job %s not resumed yet: %s", job_id, exc.message)
                continue
            except (OnehopError, OSError, ValueError, TypeError) as exc:
                log.warning("job %s cannot resume (%s); dropping it", job_id, exc)
                shutil.rmtree(path.parent, ignore_errors=True)
                continue
            try:
                self._queue_job(job_id, plan, resume=True)
            except Unavailable:  # shutting down meanwhile
                break
            recovered.append(job_id)
        return recovered

    def _queue_job(self, job_id: str, plan: JobPlan, resume: bool = False) -> str:
        job = _Job(
            status=JobStatus(
                job_id=job_id,
                state=JobState.PENDING,
                model_name=plan.request.model_name,
                dataset=plan.dataset.name,
                epochs=plan.hp.epochs,
                device=self._device_name,
                message="resuming after a restart" if resume else "",
            ),
            plan=plan,
            resume=resume,
        )
        with self._lock:
            if self._closed:
                raise Unavailable("the trainer is shutting down")
            self._jobs[job_id] = job
            self._forget_old()
        self._queue.put(job)
        log.info(
            "job %s %s: %s on %s@%d",
            job_id,
            "resumed" if resume else "queued",
            plan.request.model_name,
            plan.dataset.name,
            plan.dataset.version,
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
                self._forget_files(job)
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
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout)

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

    def _forget_files(self, job: _Job) -> None:
        """The job ended for good: its request and checkpoint are not needed any more."""
        if self._checkpoint_dir is not None:
            shutil.rmtree(self._checkpoint_dir / job.status.job_id, ignore_errors=True)

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
        cpu_started = time.process_time()
        checkpointing = None
        if self._checkpoint_dir is not None:
            path = self._checkpoint_dir / job.status.job_id / CHECKPOINT
            checkpointing = Checkpointing(path, plan.identity(), resume=job.resume)

        def cost() -> dict[str, Any]:
            elapsed = time.perf_counter() - started
            return {
                "elapsed": elapsed,
                "cpu_seconds": time.process_time() - cpu_started,
                "gpu_seconds": elapsed if self._device.type == "cuda" else 0.0,
            }

        try:
            with self._data.open(plan.dataset, plan.columns, request.target) as shards:
                self._update(job, total_steps=total_steps(shards, plan.hp))
                model = build_model(plan.spec, plan.preprocessing, plan.hp.seed)
                result = train(
                    model,
                    shards,
                    request.target,
                    plan.hp,
                    device=self._device,
                    on_progress=functools.partial(self._on_progress, job, cost),
                    should_stop=job.cancel.is_set,
                    progress_interval=self._progress_interval,
                    checkpointing=checkpointing,
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
            if self._closed:  # a shutdown, not the user: recover() continues it later
                self._finish(job, cost, JobState.CANCELLED, "the trainer shut down", True)
                return
            self._finish(job, cost, JobState.CANCELLED, str(exc))
        except TrainingFailed as exc:
            self._finish(job, cost, JobState.FAILED, str(exc))
        except OnehopError as exc:
            self._finish(job, cost, JobState.FAILED, exc.message)
        except Exception as exc:
            self._finish(job, cost, JobState.FAILED, Internal.wrap(exc).message)
        else:
            self._finish(
                job,
                cost,
                JobState.SUCCEEDED,
                f"registered {record.name} version {record.version}"
                + (" (stopped early)" if result.stopped_early else ""),
                model_version=record.version,
                metrics=dict(record.metrics),
                loss=result.loss,
                samples_per_second=result.samples_per_second,
                data_wait_share=result.data_wait_share,
                bytes_read=result.bytes_read,
                history=result.history,
                stopped_early=result.stopped_early,
                step=result.steps,
            )

    def _finish(
        self,
        job: _Job,
        cost: Callable[[], dict[str, Any]],
        state: JobState,
        message: str,
        keep_files: bool = False,
        **changes: Any,
    ) -> None:
        """Publish the job's end; its request and checkpoint go unless `keep_files`."""
        if not keep_files:
            self._forget_files(job)
        log.info("job %s %s: %s", job.status.job_id, state.name.lower(), message)
        self._update(job, state=state, message=message, **cost(), **changes)

    def _on_progress(
        self, job: _Job, cost: Callable[[], dict[str, Any]], progress: Progress
    ) -> None:
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
            bytes_read=progress.bytes_read,
            history=progress.history,
            **cost(),
        )
