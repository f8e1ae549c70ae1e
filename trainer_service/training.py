"""The training loop core: shards of Arrow tables in, a trained model and its metrics out.

It knows nothing of gRPC or Flight. A job hands it `ShardSource`s (a row count and a callable
that returns the shard's prepared table); tests hand it in-memory tables. A background
thread reads shard k+1, converts it zero-copy Arrow → numpy → torch, shuffles it by (seed,
epoch, shard) into one contiguous (pinned, on CUDA) buffer and starts its copy to the GPU,
while shard k trains; the time the loop blocks on that thread is the data-wait share.

The hot loop slices batches as views of that buffer and never synchronises per batch: losses
stay on the device and are checked (NaN, progress) once per shard or report.

Under torchrun (`Distributed`) each rank trains its share of every epoch's shards: the
epoch's shard order split rank::world, every rank running the same number of steps.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from onehop.errors import FailedPrecondition, InvalidArgument
from trainer_service import checkpoint
from trainer_service.checkpoint import Checkpoint, Position
from trainer_service.model import ModelSpec, Preprocessing, TabularModel, roc_auc
from trainer_service.optim import OPTIMIZERS, SCHEDULES, lr_factor, make_optimizer
from trainer_service.sources import ShardSource

DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 1e-3
DEFAULT_VAL_SPLIT = 0.2
DEFAULT_MOMENTUM = 0.9
ADAMW_WEIGHT_DECAY = 0.01
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 65_536
MAX_VAL_SPLIT = 0.9
MAX_WARMUP_STEPS = 10_000_000
# Salt of the shard-order permutation, apart from the per-shard row salts (the shard ids).
_ORDER_SALT = 1 << 32
# Early stopping: a validation loss at least this much lower counts as an improvement.
MIN_DELTA = 1e-4
# Validation rows scored per forward pass.
_EVAL_CHUNK = 65_536


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    val_split: float = DEFAULT_VAL_SPLIT
    seed: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = DEFAULT_MOMENTUM
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    early_stopping_patience: int = 0
    checkpoint_every_steps: int = 0

    @classmethod
    def resolve(
        cls,
        epochs: int = 0,
        batch_size: int = 0,
        lr: float = 0.0,
        val_split: float = 0.0,
        seed: int = 0,
        *,
        optimizer: str = "",
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        lr_schedule: str = "",
        warmup_steps: int = 0,
        early_stopping_patience: int = 0,
        checkpoint_every_steps: int = 0,
    ) -> Hyperparameters:
        """The proto's conventions (0 / "" = default), validated; errors name the field."""
        epochs = int(epochs) or DEFAULT_EPOCHS
        if not 1 <= epochs <= MAX_EPOCHS:
            raise InvalidArgument(f"hyperparameters.epochs must be 1..{MAX_EPOCHS}, got {epochs}")
        batch_size = int(batch_size) or DEFAULT_BATCH_SIZE
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise InvalidArgument(
                f"hyperparameters.batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}"
            )
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0.0:
            raise InvalidArgument(f"hyperparameters.lr must be a positive number, got {lr}")
        lr = lr or DEFAULT_LR
        # The proto carries float32: round so that 0.9 means 0.9, not 0.8999999761.
        val_split = round(float(val_split), 6)
        if not 0.0 <= val_split <= MAX_VAL_SPLIT:  # also rejects NaN
            raise InvalidArgument(
                f"hyperparameters.val_split must be within [0, {MAX_VAL_SPLIT}], got {val_split}"
            )
        val_split = val_split or DEFAULT_VAL_SPLIT
        seed = int(seed)
        if seed < 0:
            raise InvalidArgument(f"hyperparameters.seed must not be negative, got {seed}")
        optimizer = optimizer or "adam"
        if optimizer not in OPTIMIZERS:
            raise InvalidArgument(
                f"hyperparameters.optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}"
            )
        weight_decay = round(float(weight_decay), 9)
        if not 0.0 <= weight_decay < 1.0:
            raise InvalidArgument(
                f"hyperparameters.weight_decay must be within [0, 1), got {weight_decay}"
            )
        if optimizer == "adamw" and weight_decay == 0.0:
            weight_decay = ADAMW_WEIGHT_DECAY
        momentum = round(float(momentum), 9)
        if math.isnan(momentum) or momentum >= 1.0:
            raise InvalidArgument(
                f"hyperparameters.momentum must be below 1 (negative = none), got {momentum}"
            )
        momentum = DEFAULT_MOMENTUM if momentum == 0.0 else max(momentum, 0.0)
        lr_schedule = lr_schedule or "constant"
        if lr_schedule not in SCHEDULES:
            raise InvalidArgument(
                f"hyperparameters.lr_schedule must be one of {list(SCHEDULES)}, got {lr_schedule!r}"
            )
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("early_stopping_patience", early_stopping_patience),
            ("checkpoint_every_steps", checkpoint_every_steps),
        ):
            if not 0 <= int(value) <= MAX_WARMUP_STEPS:
                raise InvalidArgument(
                    f"hyperparameters.{name} must be 0..{MAX_WARMUP_STEPS}, got {value}"
                )
        return cls(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            val_split=val_split,
            seed=seed,
            optimizer=optimizer,
            weight_decay=weight_decay,
            momentum=momentum,
            lr_schedule=lr_schedule,
            warmup_steps=int(warmup_steps),
            early_stopping_patience=int(early_stopping_patience),
            checkpoint_every_steps=int(checkpoint_every_steps),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torch.distributed job (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1


@dataclass
class Progress:
    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    samples_per_second: float = 0.0
    data_wait_share: float = 0.0
    elapsed: float = 0.0
    bytes_read: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    metrics: dict[str, float]
    loss: float
    steps: int
    elapsed: float
    samples_per_second: float
    data_wait_share: float
    bytes_read: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Checkpointing:
    """Where a job writes its checkpoint and what must match for a resume to be allowed
    (spec, hyperparameters, data): `resume` loads it when it exists."""

    path: Path
    identity: dict[str, Any]
    resume: bool = False


class TrainingCancelled(Exception):
    """The job was cancelled; raised between batches."""


class TrainingFailed(Exception):
    """Training could not go on (e.g. the loss diverged); the message is for the user."""


def train_rows(rows: int, val_split: float) -> int:
    """Rows of a shard that train: the first (1 - val_split) in stored order."""
    return rows - int(rows * val_split)


def shard_batches(source: ShardSource, hp: Hyperparameters) -> int:
    return math.ceil(train_rows(source.rows, hp.val_split) / hp.batch_size)


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """Indices of the shards in the order epoch `epoch` trains them: a function of (seed,
    epoch) only, so a job resumes or reruns identically on any worker."""
    return [int(i) for i in _permutation(n_shards, seed, epoch, _ORDER_SALT)]


def _permutation(n: int, seed: int, epoch: int, salt: int) -> torch.Tensor:
    """A permutation of range(n) (int64 tensor) that is a pure function of (seed, epoch,
    salt), drawn by torch so it can index a tensor without a conversion."""
    state = np.random.SeedSequence([seed, epoch, salt]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
    return torch.randperm(n, generator=generator)


def rank_shards(
    shards: Sequence[ShardSource], hp: Hyperparameters, epoch: int, dist: Distributed
) -> list[ShardSource]:
    """The shards rank `dist.rank` trains in `epoch`, in order."""
    order = shard_order(len(shards), hp.seed, epoch)
    return [shards[i] for i in order[dist.rank :: dist.world_size]]


def epoch_steps(
    shards: Sequence[ShardSource], hp: Hyperparameters, epoch: int, dist: Distributed
) -> int:
    """Optimizer steps of `epoch` on every rank: all batches when alone; under DDP the
    fewest any rank has (every rank must make the same number of collective steps)."""
    return min(
        sum(
            shard_batches(s, hp)
            for s in rank_shards(shards, hp, epoch, Distributed(r, dist.world_size))
        )
        for r in range(dist.world_size)
    )


def total_steps(
    shards: Sequence[ShardSource], hp: Hyperparameters, dist: Distributed | None = None
) -> int:
    dist = dist or Distributed()
    return sum(epoch_steps(shards, hp, e, dist) for e in range(1, hp.epochs + 1))


def build_model(spec: ModelSpec, preprocessing: Preprocessing, seed: int) -> TabularModel:
    """A freshly initialised model whose weights depend on `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TabularModel(spec, preprocessing)


def table_to_arrays(
    table: pa.Table, features: Sequence[str], target: str, spec: ModelSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features as one float32 [n, k] matrix and the target as float32 [n], checked for
    the task. One copy: each Arrow chunk is viewed zero-copy and written into its rows."""
    task = spec.task if spec else "binary"
    missing = [c for c in (*features, target) if c not in table.column_names]
    if missing:
        raise InvalidArgument(f"shard is missing columns {missing}")
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        _fill(x[:, j], table.column(name))
    y = np.empty(table.num_rows, dtype=np.float32)
    _fill(y, table.column(target))
    if task == "binary" and not np.isin(y, (0.0, 1.0)).all():
        bad = y[~np.isin(y, (0.0, 1.0))][0]
        raise InvalidArgument(f"target {target!r} must be binary (0 or 1); found {bad!r}")
    if task == "multiclass":
        classes = spec.classes if spec else 0
        bad_mask = (y != np.round(y)) | (y < 0) | (y >= classes)
        if bad_mask.any():
            raise InvalidArgument(
                f"target {target!r} must hold class ids 0..{classes - 1}; found {y[bad_mask][0]!r}"
            )
    return x, y


def _fill(out: np.ndarray, column: pa.ChunkedArray) -> None:
    """Write `column` as float32 into `out` chunk by chunk (no concatenated temporary).
    Nulls read as NaN and surface as a NaN loss with a hint at the data."""
    if not pa.types.is_float32(column.type):
        column = pc.cast(column, pa.float32())
    offset = 0
    for chunk in column.chunks:
        out[offset : offset + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        offset += len(chunk)


@dataclass
class _Decoded:
    """One shard ready to train: its training rows shuffled and on the device (batches
    `begin`..`end` of it train), its validation rows in host memory."""

    epoch: int
    shard: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: np.ndarray
    y_val: np.ndarray
    begin: int
    end: int
    ready: Any = None  # CUDA event: the copy to the device is done
    host: tuple[torch.Tensor, ...] = ()  # pinned buffers kept alive until `ready`


class _End:
    pass


@dataclass
class _Failure:
    error: BaseException


class Prefetcher:
    """Reads and decodes shards on a background thread, at most `depth` ahead of the loop.

    `get()` returns the next decoded shard and adds the time it blocked to `wait_seconds`.
    """

    def __init__(self, items: Iterator[Any], decode: Callable[[Any], object], depth: int = 1):
        self._items = items
        self._decode = decode
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="trainer-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                if not self._put(self._decode(item)):
                    return
        except BaseException as exc:  # handed to the training thread, which re-raises it
            self._put(_Failure(exc))
            return
        self._put(_End())

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.02)
                return True
            except queue.Full:
                continue
        return False

    def get(self, should_stop: Callable[[], bool] = lambda: False) -> object:
        """The next decoded shard; polls `should_stop` while waiting, so a cancel is not held
        up by a slow read."""
        started = time.perf_counter()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.05)
                    break
                except queue.Empty:
                    if should_stop():
                        raise TrainingCancelled("cancelled while waiting for data") from None
        finally:
            self.wait_seconds += time.perf_counter() - started
        if isinstance(item, _Failure):
            raise item.error
        if isinstance(item, _End):
            raise RuntimeError("prefetcher ran out of shards")
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5.0)


def train(
    model: TabularModel,
    shards: Sequence[ShardSource],
    target: str,
    hp: Hyperparameters,
    *,
    device: torch.device | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress_interval: float = 0.2,
    checkpointing: Checkpointing | None = None,
    dist: Distributed | None = None,
) -> TrainResult:
    """Train `model.net` on the shards' standardised features; validate after every epoch.

    Per epoch the shard order is a permutation of (seed, epoch) and each shard's training rows
    are shuffled by (seed, epoch, shard). `on_progress` is called at most every
    `progress_interval` seconds and after each epoch (with validation metrics);
    `should_stop` is polled between batches (TrainingCancelled). With `checkpointing` a
    checkpoint is written every `hp.checkpoint_every_steps` steps and after every epoch, and
    a resume continues from the last one at the same step and data position.
    """
    if not shards:
        raise InvalidArgument("the dataset has no shards to train on")
    if sum(train_rows(s.rows, hp.val_split) for s in shards) == 0:
        raise InvalidArgument("the dataset has no training rows after the validation split")
    loop = _Loop(
        model,
        list(shards),
        target,
        hp,
        device or torch.device("cpu"),
        on_progress or (lambda progress: None),
        should_stop or (lambda: False),
        progress_interval,
        checkpointing,
        dist or Distributed(),
    )
    return loop.run()


class _Loop:
    """One run of `train`: the prefetch pipeline, the optimiser and the counters."""

    def __init__(
        self,
        model: TabularModel,
        shards: list[ShardSource],
        target: str,
        hp: Hyperparameters,
        device: torch.device,
        on_progress: Callable[[Progress], None],
        should_stop: Callable[[], bool],
        progress_interval: float,
        checkpointing: Checkpointing | None,
        dist: Distributed,
    ):
        self.model = model
        self.spec = model.spec
        self.shards = shards
        self.target = target
        self.hp = hp
        self.device = device
        self.cuda = device.type == "cuda"
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.progress_interval = progress_interval
        self.checkpointing = checkpointing
        self.dist = dist
        self.steps_of_epoch = [0] + [
            epoch_steps(shards, hp, e, dist) for e in range(1, hp.epochs + 1)
        ]
        self.total_steps = sum(self.steps_of_epoch)
        self.pos = Position()
        self.bytes_read = 0
        self.started = 0.0
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        if self.spec.task == "binary":
            self.loss_fn: nn.Module = nn.BCEWithLogitsLoss()
        elif self.spec.task == "multiclass":
            self.loss_fn = nn.CrossEntropyLoss()
        else:
            self.loss_fn = nn.MSELoss()
        pre = model.preprocessing
        self.target_mean, self.target_std = pre.target_mean, pre.target_std

    # --- the data pipeline (prefetch thread) ---------------------------------------------

    def schedule(self, start: Position) -> Iterator[tuple[int, ShardSource, int, int]]:
        """(epoch, shard, first batch, end batch) from `start` on. A resumed epoch still
        yields the shards it already trained (with no batches) for their validation rows."""
        for epoch in range(start.epoch, self.hp.epochs + 1):
            skip = start.epoch_step if epoch == start.epoch else 0
            budget = self.steps_of_epoch[epoch]
            for source in rank_shards(self.shards, self.hp, epoch, self.dist):
                n = shard_batches(source, self.hp)
                begin = min(skip, n)
                end = min(n, begin + max(budget, 0))
                skip -= begin
                budget -= end - begin
                yield epoch, source, begin, end

    def decode(self, item: tuple[int, ShardSource, int, int]) -> _Decoded:
        """Runs on the prefetch thread: read, convert, split, shuffle into one contiguous
        buffer (pinned on CUDA) and start its copy to the device."""
        epoch, source, begin, end = item
        table = source.read()
        self.bytes_read += table.nbytes
        cut = train_rows(table.num_rows, self.hp.val_split)
        if end <= begin:  # trained before a resume: only its validation rows are needed
            table = table.slice(cut)
            cut = 0
        x, y = table_to_arrays(table, self.model.features, self.target, self.spec)
        if self.spec.task == "regression":
            y = (y - np.float32(self.target_mean)) / np.float32(self.target_std)
        perm = _permutation(cut, self.hp.seed, epoch, source.shard)
        x_all, y_all = torch.from_numpy(x), torch.from_numpy(y)
        x_train = torch.empty((cut, x.shape[1]), dtype=torch.float32, pin_memory=self.cuda)
        y_train = torch.empty((cut,), dtype=torch.float32, pin_memory=self.cuda)
        torch.index_select(x_all[:cut], 0, perm, out=x_train)
        torch.index_select(y_all[:cut], 0, perm, out=y_train)
        decoded = _Decoded(epoch, source.shard, x_train, y_train, x[cut:], y[cut:], begin, end)
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                decoded.host = (x_train, y_train)
                decoded.x_train = x_train.to(self.device, non_blocking=True)
                decoded.y_train = y_train.to(self.device, non_blocking=True)
                decoded.ready = torch.cuda.Event()
                decoded.ready.record(self.copy_stream)
        return decoded

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.model.to(self.device)
        self.net: nn.Module = self.model.net
        if self.dist.active:
            self.net = DistributedDataParallel(
                self.model.net, device_ids=[self.device.index] if self.cuda else None
            )
        self.optimizer = make_optimizer(
            self.hp.optimizer,
            self.model.net.parameters(),
            self.hp.lr,
            self.hp.weight_decay,
            self.hp.momentum,
        )
        self.constant_lr = self.hp.lr_schedule == "constant" and not self.hp.warmup_steps
        self.started = time.perf_counter()
        samples, stopped_early = 0, False
        waited = 0.0
        # Seeded dropout without disturbing the process-wide generators; one stream per rank.
        fork = torch.random.fork_rng(devices=[self.device.index or 0] if self.cuda else [])
        with fork:
            torch.manual_seed(self.hp.seed * 1009 + self.dist.rank)
            self.resume()
            prefetcher = Prefetcher(self.schedule(self.pos), self.decode)
            try:
                while self.pos.epoch <= self.hp.epochs:
                    samples += self.run_epoch(prefetcher)
                    epoch_waited = prefetcher.wait_seconds - self.epoch_waited_before
                    waited += epoch_waited
                    if self.end_epoch(epoch_waited):
                        stopped_early = True
                        break
            finally:
                prefetcher.close()
        elapsed = time.perf_counter() - self.started
        last = self.pos.history[-1] if self.pos.history else {}
        return TrainResult(
            metrics=self.pos.metrics,
            loss=float(last.get("loss", float("nan"))),
            steps=self.pos.step,
            elapsed=elapsed,
            samples_per_second=samples / elapsed if elapsed > 0 else 0.0,
            data_wait_share=min(waited / elapsed, 1.0) if elapsed > 0 else 0.0,
            bytes_read=self.bytes_read,
            stopped_early=stopped_early,
            history=list(self.pos.history),
        )

    def resume(self) -> None:
        cp = self.checkpointing
        if cp is None or not cp.resume or not cp.path.exists():
            return
        saved = checkpoint.load(cp.path)
        if saved.identity != cp.identity:
            raise FailedPrecondition(
                f"checkpoint {cp.path} belongs to a different job (model, data or "
                "hyperparameters differ); start without --resume"
            )
        try:
            self.model.load_state_dict(saved.model, strict=True)
            self.optimizer.load_state_dict(saved.optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FailedPrecondition(
                f"checkpoint {cp.path} does not fit the model: {exc}"
            ) from None
        torch.set_rng_state(saved.rng)
        if self.cuda and saved.cuda_rng is not None:
            torch.cuda.set_rng_state(saved.cuda_rng, self.device)
        self.pos = saved.position

    def run_epoch(self, prefetcher: Prefetcher) -> int:
        """Train the rest of epoch `self.pos.epoch`; returns the samples it trained and
        leaves the epoch's validation rows in `self.val`."""
        epoch = self.pos.epoch
        self.net.train()
        self.epoch_started = time.perf_counter()
        self.epoch_waited_before = prefetcher.wait_seconds
        x_val: list[np.ndarray] = []
        y_val: list[np.ndarray] = []
        samples = 0
        last_report = time.perf_counter()
        every = self.hp.checkpoint_every_steps
        for _ in range(len(rank_shards(self.shards, self.hp, epoch, self.dist))):
            shard = prefetcher.get(self.should_stop)
            assert isinstance(shard, _Decoded) and shard.epoch == epoch
            x_val.append(shard.x_val)
            y_val.append(shard.y_val)
            if shard.end <= shard.begin:
                continue
            if shard.ready is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(shard.ready)
                shard.x_train.record_stream(stream)
                shard.y_train.record_stream(stream)
            xs = shard.x_train.split(self.hp.batch_size)[shard.begin : shard.end]
            ys = shard.y_train.split(self.hp.batch_size)[shard.begin : shard.end]
            losses: list[torch.Tensor] = []
            first_step = self.pos.step
            folded = 0
            for i, (xb, yb) in enumerate(zip(xs, ys, strict=True)):
                if self.should_stop():
                    self.fold(losses, folded, i, first_step, xs)
                    raise TrainingCancelled(f"cancelled at epoch {epoch} step {self.pos.step}")
                losses.append(self.train_batch(xb, yb))
                now = time.perf_counter()
                checkpoint_due = every and self.pos.step % every == 0
                if checkpoint_due or now - last_report >= self.progress_interval:
                    samples += self.fold(losses, folded, i + 1, first_step, xs)
                    folded = i + 1
                    if checkpoint_due:
                        self.save_checkpoint()
                    if now - last_report >= self.progress_interval:
                        last_report = now
                        self.report(prefetcher)
            samples += self.fold(losses, folded, len(xs), first_step, xs)
        self.val = (
            np.concatenate(x_val) if x_val else np.empty((0, self.model.n_features), np.float32),
            np.concatenate(y_val) if y_val else np.empty((0,), np.float32),
        )
        return samples

    def train_batch(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss, left on the device (no per-batch
        synchronisation)."""
        step = self.pos.step
        if not self.constant_lr:
            factor = lr_factor(self.hp.lr_schedule, step, self.total_steps, self.hp.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = self.hp.lr * factor
        if self.cuda:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                out = self.net(xb)
            out = out.float()
        else:
            out = self.net(xb)
        if self.spec.task == "multiclass":
            loss = self.loss_fn(out, yb.long())
        else:
            loss = self.loss_fn(out.squeeze(1), yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.pos.step = step + 1
        self.pos.epoch_step += 1
        return loss.detach()

    def fold(
        self,
        losses: list[torch.Tensor],
        lo: int,
        hi: int,
        first_step: int,
        xs: Sequence[torch.Tensor],
    ) -> int:
        """Fold the losses of batches lo..hi into the epoch's counters (one synchronisation);
        a NaN or infinite loss fails the job naming the first step that produced it.
        Returns the samples of those batches."""
        if hi <= lo:
            return 0
        values = torch.stack(losses[lo:hi]).float().cpu()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0])
            what = "NaN" if math.isnan(float(values[index])) else "infinite"
            raise TrainingFailed(
                f"loss became {what} at epoch {self.pos.epoch} step {first_step + lo + index + 1}"
                "; check the data for missing or extreme values, or lower the learning rate"
            )
        samples = sum(int(x.shape[0]) for x in xs[lo:hi])
        self.pos.epoch_loss_sum += float(values.sum())
        self.pos.epoch_samples += samples
        return samples

    def end_epoch(self, waited: float) -> bool:
        """Validate, record the epoch, checkpoint; True when early stopping says stop."""
        pos = self.pos
        seconds = time.perf_counter() - self.epoch_started
        metrics = evaluate(self.model, self.val[0], self.val[1], self.device, self.dist)
        loss = pos.epoch_loss_sum / max(pos.epoch_step, 1)
        rate = pos.epoch_samples / seconds if seconds > 0 else 0.0
        wait_share = min(waited / seconds, 1.0) if seconds > 0 else 0.0
        pos.history.append(
            {
                "epoch": pos.epoch,
                "loss": loss,
                "metrics": metrics,
                "samples_per_second": rate,
                "data_wait_share": wait_share,
            }
        )
        pos.metrics = metrics
        stop = False
        val_loss = metrics.get("loss", loss)
        if val_loss < pos.best_val_loss - MIN_DELTA:
            pos.best_val_loss, pos.epochs_without_improvement = val_loss, 0
        else:
            pos.epochs_without_improvement += 1
            patience = self.hp.early_stopping_patience
            stop = bool(patience) and pos.epochs_without_improvement >= patience
        self.on_progress(self.progress(loss, rate, wait_share))
        pos.epoch += 1
        pos.epoch_step = 0
        pos.epoch_loss_sum, pos.epoch_samples = 0.0, 0
        if stop:
            pos.epoch = self.hp.epochs + 1
        self.save_checkpoint()
        return stop

    def save_checkpoint(self) -> None:
        cp = self.checkpointing
        if cp is None or self.dist.rank != 0:
            return
        checkpoint.save(
            cp.path,
            Checkpoint(
                position=self.pos,
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                rng=torch.get_rng_state(),
                identity=cp.identity,
                cuda_rng=torch.cuda.get_rng_state(self.device) if self.cuda else None,
            ),
        )

    def progress(self, loss: float, samples_per_second: float, wait_share: float) -> Progress:
        return Progress(
            epoch=min(self.pos.epoch, self.hp.epochs),
            epochs=self.hp.epochs,
            step=self.pos.step,
            total_steps=self.total_steps,
            loss=loss,
            metrics=dict(self.pos.metrics),
            samples_per_second=samples_per_second,
            data_wait_share=wait_share,
            elapsed=time.perf_counter() - self.started,
            bytes_read=self.bytes_read,
            history=list(self.pos.history),
        )

    def report(self, prefetcher: Prefetcher) -> None:
        """A mid-epoch progress report: the epoch's running loss, rate and data wait."""
        seconds = time.perf_counter() - self.epoch_started
        waited = prefetcher.wait_seconds - self.epoch_waited_before
        pos = self.pos
        loss = pos.epoch_loss_sum / pos.epoch_step if pos.epoch_step else float("nan")
        self.on_progress(
            self.progress(
                loss,
                pos.epoch_samples / seconds if seconds > 0 else 0.0,
                min(waited / seconds, 1.0) if seconds > 0 else 0.0,
            )
        )


def evaluate(
    model: TabularModel,
    x: np.ndarray,
    y: np.ndarray,
    device: torch.device,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """Validation metrics (fp32, eval mode) over the standardised features `x` and the
    training-form target `y`: loss, accuracy and AUC (binary), loss and accuracy
    (multiclass), loss and RMSE / MAE in the target's units (regression); {} without rows.
    Under DDP every rank's validation rows are gathered first (each rank holds the rows of
    its own shards)."""
    if dist is not None and dist.active:
        parts: list[Any] = [None] * dist.world_size
        torch_dist.all_gather_object(parts, (x, y))
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
    if len(y) == 0:
        return {}
    net = model.net
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            out = torch.cat(
                [
                    net(torch.from_numpy(x[i : i + _EVAL_CHUNK]).to(device)).float()
                    for i in range(0, len(y), _EVAL_CHUNK)
                ]
            ).cpu()
    finally:
        net.train(was_training)
    labels = torch.from_numpy(y)
    task = model.spec.task
    if task == "binary":
        logits = out.squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
        scores = logits.numpy()
        metrics = {"loss": loss, "accuracy": float(((scores >= 0.0) == (y >= 0.5)).mean())}
        auc = roc_auc(y, scores)
        if not math.isnan(auc):
            metrics["auc"] = auc
        return metrics
    if task == "multiclass":
        loss = nn.functional.cross_entropy(out, labels.long()).item()
        accuracy = float((out.argmax(dim=1) == labels.long()).float().mean())
        return {"loss": loss, "accuracy": accuracy}
    pred = out.squeeze(1)
    loss = nn.functional.mse_loss(pred, labels).item()
    scale = model.preprocessing.target_std
    error = (pred - labels).abs() * scale
    return {
        "loss": loss,
        "rmse": float(torch.sqrt((error**2).mean())),
        "mae": float(error.mean()),
    }
