"""The training loop core: shards of Arrow tables in, a trained model and its metrics out.

It knows nothing of gRPC or Flight. A job hands it `ShardSource`s (a row count and a callable
that returns the shard's prepared table); unit tests hand it in-memory tables. A background
thread reads and decodes shard k+1 while shard k trains; the time the loop spends blocked on
that thread is the data-wait share.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from onehop.dataplane import epoch_permutation
from onehop.errors import InvalidArgument
from trainer_service.model import ModelSpec, Preprocessing, TabularModel, roc_auc

DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 1e-3
DEFAULT_VAL_SPLIT = 0.2
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 65_536
MAX_VAL_SPLIT = 0.9
# Salt of the shard-order permutation, apart from the per-shard row salts (the shard ids).
_ORDER_SALT = 1 << 32
# Validation rows scored per forward pass.
_EVAL_CHUNK = 65_536


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    val_split: float = DEFAULT_VAL_SPLIT
    seed: int = 0

    @classmethod
    def resolve(
        cls,
        epochs: int = 0,
        batch_size: int = 0,
        lr: float = 0.0,
        val_split: float = 0.0,
        seed: int = 0,
    ) -> Hyperparameters:
        """The proto's conventions (0 = default), validated; errors name the field."""
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
        return cls(epochs=epochs, batch_size=batch_size, lr=lr, val_split=val_split, seed=seed)


@dataclass(frozen=True)
class ShardSource:
    """One shard of the training data: its row count (for step totals) and its reader."""

    shard: int
    rows: int
    read: Callable[[], pa.Table]

    @classmethod
    def from_table(cls, shard: int, table: pa.Table) -> ShardSource:
        return cls(shard=shard, rows=table.num_rows, read=lambda: table)


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


@dataclass
class TrainResult:
    metrics: dict[str, float]
    loss: float
    steps: int
    elapsed: float
    samples_per_second: float
    data_wait_share: float


class TrainingCancelled(Exception):
    """The job was cancelled; raised between batches."""


class TrainingFailed(Exception):
    """Training could not go on (e.g. the loss diverged); the message is for the user."""


def train_rows(rows: int, val_split: float) -> int:
    """Rows of a shard that train: the first (1 - val_split) in stored order."""
    return rows - int(rows * val_split)


def total_steps(shards: Sequence[ShardSource], hp: Hyperparameters) -> int:
    per_epoch = sum(math.ceil(train_rows(s.rows, hp.val_split) / hp.batch_size) for s in shards)
    return per_epoch * hp.epochs


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """Indices of the shards in the order epoch `epoch` trains them: a function of (seed,
    epoch) only, so a job resumes or reruns identically on any worker."""
    return [int(i) for i in epoch_permutation(n_shards, seed, epoch, _ORDER_SALT)]


def build_model(spec: ModelSpec, preprocessing: Preprocessing, seed: int) -> TabularModel:
    """A freshly initialised model whose weights depend on `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TabularModel(spec, preprocessing)


def table_to_arrays(
    table: pa.Table, features: Sequence[str], target: str
) -> tuple[np.ndarray, np.ndarray]:
    """Features as one float32 [n, k] matrix and the binary target as float32 [n]."""
    missing = [c for c in (*features, target) if c not in table.column_names]
    if missing:
        raise InvalidArgument(f"shard is missing columns {missing}")
    columns = [_float32(table.column(name)) for name in features]
    x = np.column_stack(columns) if columns else np.empty((table.num_rows, 0), np.float32)
    y = _float32(table.column(target))
    if not np.isin(y, (0.0, 1.0)).all():
        bad = y[~np.isin(y, (0.0, 1.0))][0]
        raise InvalidArgument(f"target {target!r} must be binary (0 or 1); found {bad!r}")
    return np.ascontiguousarray(x, dtype=np.float32), y


def _float32(column: pa.ChunkedArray) -> np.ndarray:
    if not pa.types.is_float32(column.type):
        column = pc.cast(column, pa.float32())
    # Nulls read as NaN; they surface as a NaN loss with a hint at the data.
    return column.to_numpy()


@dataclass
class _Decoded:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: np.ndarray
    y_val: np.ndarray


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
                self._queue.put(item, timeout=0.1)
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
) -> TrainResult:
    """Train `model.net` on the shards' standardised features; validate after every epoch.

    Per epoch the shard order is a permutation of (seed, epoch) and each shard's training rows
    are shuffled by (seed, epoch, shard). `on_progress` is called at most every
    `progress_interval` seconds and after each epoch (with validation metrics);
    `should_stop` is polled between batches (TrainingCancelled).
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
    )
    return loop.run()


@dataclass
class _Epoch:
    """Counters of the epoch in progress."""

    number: int
    started: float
    waited_before: float
    loss_sum: float = 0.0
    batches: int = 0
    samples: int = 0
    last_report: float = 0.0


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
    ):
        self.model = model
        self.net = model.net
        self.shards = shards
        self.target = target
        self.hp = hp
        self.device = device
        self.cuda = device.type == "cuda"
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.progress_interval = progress_interval
        self.total_steps = total_steps(shards, hp)
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.started = 0.0

    def schedule(self) -> Iterator[tuple[int, ShardSource]]:
        for epoch in range(1, self.hp.epochs + 1):
            for index in shard_order(len(self.shards), self.hp.seed, epoch):
                yield epoch, self.shards[index]

    def decode(self, item: tuple[int, ShardSource]) -> _Decoded:
        """Runs on the prefetch thread: read, convert, split, shuffle, pin."""
        epoch, source = item
        x, y = table_to_arrays(source.read(), self.model.features, self.target)
        cut = train_rows(len(y), self.hp.val_split)
        perm = epoch_permutation(cut, self.hp.seed, epoch, source.shard)
        x_train = torch.from_numpy(x[:cut][perm])
        y_train = torch.from_numpy(y[:cut][perm])
        if self.cuda:  # pinned pages let the copy to the GPU run asynchronously
            x_train, y_train = x_train.pin_memory(), y_train.pin_memory()
        return _Decoded(x_train, y_train, x[cut:], y[cut:])

    def run(self) -> TrainResult:
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.hp.lr)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.started = time.perf_counter()
        loss, samples, waited = float("nan"), 0, 0.0
        prefetcher = Prefetcher(self.schedule(), self.decode)
        # Seeded dropout without disturbing the process-wide generators.
        fork = torch.random.fork_rng(devices=[self.device.index or 0] if self.cuda else [])
        try:
            with fork:
                torch.manual_seed(self.hp.seed)
                for number in range(1, self.hp.epochs + 1):
                    epoch = self.run_epoch(number, prefetcher)
                    loss = epoch.loss_sum / max(epoch.batches, 1)
                    samples += epoch.samples
                    waited += prefetcher.wait_seconds - epoch.waited_before
        finally:
            prefetcher.close()
        elapsed = time.perf_counter() - self.started
        return TrainResult(
            metrics=self.metrics,
            loss=loss,
            steps=self.step,
            elapsed=elapsed,
            samples_per_second=samples / elapsed if elapsed > 0 else 0.0,
            data_wait_share=waited / elapsed if elapsed > 0 else 0.0,
        )

    def run_epoch(self, number: int, prefetcher: Prefetcher) -> _Epoch:
        now = time.perf_counter()
        epoch = _Epoch(number, now, prefetcher.wait_seconds, last_report=now)
        self.net.train()
        x_val: list[np.ndarray] = []
        y_val: list[np.ndarray] = []
        for _ in range(len(self.shards)):
            shard = prefetcher.get(self.should_stop)
            assert isinstance(shard, _Decoded)
            x_val.append(shard.x_val)
            y_val.append(shard.y_val)
            xs = shard.x_train.to(self.device, non_blocking=True)
            ys = shard.y_train.to(self.device, non_blocking=True)
            for begin in range(0, xs.shape[0], self.hp.batch_size):
                if self.should_stop():
                    raise TrainingCancelled(f"cancelled at epoch {number} step {self.step}")
                end = begin + self.hp.batch_size
                self.train_batch(epoch, xs[begin:end], ys[begin:end])
                now = time.perf_counter()
                if now - epoch.last_report >= self.progress_interval:
                    epoch.last_report = now
                    self.report(epoch, prefetcher, epoch.loss_sum / epoch.batches)
        self.metrics = evaluate(self.net, np.concatenate(x_val), np.concatenate(y_val), self.device)
        self.report(epoch, prefetcher, epoch.loss_sum / max(epoch.batches, 1))
        return epoch

    def train_batch(self, epoch: _Epoch, xb: torch.Tensor, yb: torch.Tensor) -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.cuda):
            logits = self.net(xb).squeeze(1)
        loss = self.loss_fn(logits.float(), yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        value = loss.item()
        if not math.isfinite(value):
            what = "NaN" if math.isnan(value) else "infinite"
            raise TrainingFailed(
                f"loss became {what} at epoch {epoch.number} step {self.step}; check the data "
                "for missing or extreme values, or lower the learning rate"
            )
        epoch.loss_sum += value
        epoch.batches += 1
        epoch.samples += int(xb.shape[0])

    def report(self, epoch: _Epoch, prefetcher: Prefetcher, loss: float) -> None:
        now = time.perf_counter()
        seconds = now - epoch.started
        waited = prefetcher.wait_seconds - epoch.waited_before
        self.on_progress(
            Progress(
                epoch=epoch.number,
                epochs=self.hp.epochs,
                step=self.step,
                total_steps=self.total_steps,
                loss=loss,
                metrics=dict(self.metrics),
                samples_per_second=epoch.samples / seconds if seconds > 0 else 0.0,
                data_wait_share=min(waited / seconds, 1.0) if seconds > 0 else 0.0,
                elapsed=now - self.started,
            )
        )


def evaluate(
    net: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device
) -> dict[str, float]:
    """Validation loss, accuracy and ROC AUC (fp32, eval mode); {} without validation rows."""
    if len(y) == 0:
        return {}
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            logits = torch.cat(
                [
                    net(torch.from_numpy(x[i : i + _EVAL_CHUNK]).to(device)).squeeze(1).float()
                    for i in range(0, len(y), _EVAL_CHUNK)
                ]
            ).cpu()
            labels = torch.from_numpy(y)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    finally:
        net.train(was_training)
    scores = logits.numpy()
    metrics = {"loss": loss, "accuracy": float(((scores >= 0.0) == (y >= 0.5)).mean())}
    auc = roc_auc(y, scores)
    if not math.isnan(auc):
        metrics["auc"] = auc
    return metrics
