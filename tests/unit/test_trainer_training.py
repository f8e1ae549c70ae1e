"""The trainer's model spec, optimisers, schedules, early stopping, checkpoints and the
dynamic batcher, without any service."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import SafetensorError

from onehop.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from trainer_service import checkpoint
from trainer_service.inference import Batcher, BatchingConfig, Predictor
from trainer_service.jobs import JobManager, JobRequest, JobState, make_plan
from trainer_service.model import ModelSpec, Preprocessing
from trainer_service.optim import OPTIMIZERS, lr_factor
from trainer_service.registry import Registry
from trainer_service.sources import TableData
from trainer_service.training import (
    Checkpointing,
    TrainingCancelled,
    build_model,
    train,
)

CPU = torch.device("cpu")


def blobs(rows: int = 900, classes: int = 3, seed: int = 0) -> pa.Table:
    """Features on different scales; `label` = class of the nearest centre, `value` = a
    linear function of the features plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 4)) * 3
    label = rng.integers(0, classes, rows)
    x = centres[label] + rng.normal(size=(rows, 4))
    x = x * np.array([1.0, 100.0, 0.01, 5.0]) + np.array([0.0, 50.0, 1.0, -3.0])
    z = (x - np.array([0.0, 50.0, 1.0, -3.0])) / np.array([1.0, 100.0, 0.01, 5.0])
    value = 1000.0 + 200.0 * z[:, 0] - 50.0 * z[:, 1] + rng.normal(0, 5, rows)
    columns = {f"f{i}": x[:, i].astype(np.float32) for i in range(4)}
    return pa.table({**columns, "label": label, "value": value, "binary": (label == 0) * 1})


def plan_and_train(
    table: pa.Table,
    target: str,
    task: str,
    features: tuple[str, ...] = ("f0", "f1", "f2", "f3"),
    **hp: object,
):  # type: ignore[no-untyped-def]
    data = TableData("t", table, shards=3)
    plan = make_plan(
        JobRequest(dataset="t", target=target, model_name="m", task=task, features=features, **hp),
        data,
    )
    model = build_model(plan.spec, plan.preprocessing, plan.hp.seed)
    with data.open(plan.dataset, plan.columns, target) as shards:
        result = train(model, shards, target, plan.hp, device=CPU)
    return model, result, plan


# --- the model spec ------------------------------------------------------------------------


def test_multiclass_learns_and_answers_probabilities_per_class() -> None:
    table = blobs()
    model, result, plan = plan_and_train(table, "label", "multiclass", epochs=4, lr=1e-2)
    assert plan.spec.classes == 3 and plan.spec.outputs == 3
    assert result.metrics["accuracy"] > 0.9
    raw = torch.from_numpy(np.column_stack([table.column(f"f{i}").to_numpy() for i in range(4)]))
    with torch.inference_mode():
        p = model.eval().predict(raw)
    assert p.shape == (900, 3)
    assert torch.allclose(p.sum(dim=1), torch.ones(900), atol=1e-5)


def test_regression_answers_in_the_target_units() -> None:
    table = blobs()
    model, result, plan = plan_and_train(
        table, "value", "regression", epochs=8, lr=1e-2, dropout=-1.0, hidden=(32,)
    )
    std = float(np.std(table.column("value").to_numpy()))
    assert set(result.metrics) == {"loss", "rmse", "mae"}
    # A linear target: far better than predicting the mean (whose RMSE is the std).
    assert result.metrics["rmse"] < 0.25 * std
    raw = torch.from_numpy(np.column_stack([table.column(f"f{i}").to_numpy() for i in range(4)]))
    with torch.inference_mode():
        predicted = model.eval().predict(raw)[:, 0].numpy()
    error = predicted - table.column("value").to_numpy()
    assert np.sqrt(np.mean(error**2)) < 0.25 * std


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_and_activation_learns(optimizer: str) -> None:
    _, result, plan = plan_and_train(
        blobs(600),
        "binary",
        "binary",
        epochs=3,
        lr=1e-2 if optimizer != "sgd" else 5e-2,
        optimizer=optimizer,
        activation="gelu",
        hidden=(16, 8),
        lr_schedule="cosine",
        warmup_steps=5,
    )
    assert plan.hp.optimizer == optimizer
    assert result.metrics["auc"] > 0.9
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"optimizer": "rmsprop"}, "hyperparameters.optimizer"),
        ({"lr_schedule": "exp"}, "hyperparameters.lr_schedule"),
        ({"weight_decay": -1.0}, "hyperparameters.weight_decay"),
        ({"momentum": 1.5}, "hyperparameters.momentum"),
        ({"activation": "swish2"}, "model.activation"),
        ({"task": "ranking"}, "model.task"),
        ({"task": "binary", "target": "label"}, "target"),
        ({"task": "multiclass", "target": "value"}, "target"),
        ({"hidden": (8,) * 20}, "model.hidden"),
    ],
)
def test_invalid_spec_and_hyperparameters_name_the_field(changes: dict, field: str) -> None:
    request = {"dataset": "t", "target": "binary", "model_name": "m", **changes}
    with pytest.raises(InvalidArgument, match=field):
        make_plan(JobRequest(**request), TableData("t", blobs(60)))


def test_schedules_warm_up_then_decay() -> None:
    assert [lr_factor("constant", s, 100, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor("cosine", 4, 104, 4) == 1.0
    assert lr_factor("cosine", 54, 104, 4) == pytest.approx(0.5)
    assert lr_factor("linear", 104, 104, 4) == 0.0
    assert lr_factor("linear", 29, 104, 4) == pytest.approx(0.75)


def test_early_stopping_ends_the_job_when_validation_stops_improving() -> None:
    _, result, _ = plan_and_train(
        blobs(300), "binary", "binary", epochs=50, lr=1e-9, early_stopping_patience=2
    )
    assert result.stopped_early
    # Epoch 1 sets the best; 2 and 3 do not improve on it by MIN_DELTA.
    assert len(result.history) == 3


# --- checkpoints ---------------------------------------------------------------------------


def shards_and_plan(rows: int = 600):  # type: ignore[no-untyped-def]
    data = TableData("t", blobs(rows), shards=3)
    plan = make_plan(
        JobRequest(
            dataset="t",
            target="binary",
            model_name="m",
            features=("f0", "f1", "f2", "f3"),
            epochs=3,
            batch_size=16,
            checkpoint_every_steps=7,
        ),
        data,
    )
    return data, plan


def test_resume_continues_at_the_same_step_and_data_position(tmp_path: Path) -> None:
    data, plan = shards_and_plan()
    with data.open(plan.dataset, plan.columns, "binary") as shards:
        whole = build_model(plan.spec, plan.preprocessing, 0)
        expected = train(whole, shards, "binary", plan.hp, device=CPU)

        path = tmp_path / "checkpoint.safetensors"
        first = build_model(plan.spec, plan.preprocessing, 0)
        steps = iter(range(10_000))
        # Stop mid-epoch 2, a few steps past a checkpoint.
        with pytest.raises(TrainingCancelled):
            train(
                first,
                shards,
                "binary",
                plan.hp,
                device=CPU,
                should_stop=lambda: next(steps) >= 40,
                checkpointing=Checkpointing(path, plan.identity()),
            )
        saved = checkpoint.load(path)
        assert saved.position.step == 35 and saved.position.epoch == 2

        resumed = build_model(plan.spec, plan.preprocessing, 0)
        result = train(
            resumed,
            shards,
            "binary",
            plan.hp,
            device=CPU,
            checkpointing=Checkpointing(path, plan.identity(), resume=True),
        )
    assert result.steps == expected.steps
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert result.metrics == expected.metrics


def test_a_checkpoint_of_another_job_is_refused(tmp_path: Path) -> None:
    data, plan = shards_and_plan(120)
    path = tmp_path / "checkpoint.safetensors"
    with data.open(plan.dataset, plan.columns, "binary") as shards:
        model = build_model(plan.spec, plan.preprocessing, 0)
        train(model, shards, "binary", plan.hp, checkpointing=Checkpointing(path, {"a": 1}))
        with pytest.raises(FailedPrecondition, match="different job"):
            train(
                model,
                shards,
                "binary",
                plan.hp,
                checkpointing=Checkpointing(path, {"a": 2}, resume=True),
            )


class _Sentinel:
    """Unpickling this creates a file: proof that something unpickled the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "truncated"])
def test_untrusted_checkpoints_are_refused_without_unpickling(tmp_path: Path, kind: str) -> None:
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "checkpoint.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(_Sentinel(sentinel)))
    elif kind == "torch.save":
        torch.save({"weights": torch.zeros(3), "evil": _Sentinel(sentinel)}, path)
    else:
        data, plan = shards_and_plan(120)
        with data.open(plan.dataset, plan.columns, "binary") as shards:
            model = build_model(plan.spec, plan.preprocessing, 0)
            train(model, shards, "binary", plan.hp, checkpointing=Checkpointing(path, {}))
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FailedPrecondition, match="not a onehop safetensors checkpoint"):
        checkpoint.load(path)
    assert not sentinel.exists()


def test_a_pickle_registered_as_weights_is_refused_and_the_old_version_serves(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)
    pre_model = build_model(ModelSpec.resolve([8]), _pre(), 0)
    registry.register("risk", pre_model, target="y")
    predictor = Predictor(registry, CPU)
    x = np.ones((2, 2), np.float32)
    before = predictor.predict("risk", 0, x)

    registry.register(
        "risk", build_model(ModelSpec.resolve([8]), _pre(), 1), target="y", promote=False
    )
    sentinel = tmp_path / "sentinel"
    weights = tmp_path / "risk" / "2" / "model.safetensors"
    torch.save({"net.0.weight": _Sentinel(sentinel)}, weights)
    # The attacker fixes the digest up too: the format check must still refuse it.
    meta_path = tmp_path / "risk" / "2" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_digest"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))

    with pytest.raises(FailedPrecondition):
        registry.promote("risk", 2)
    (tmp_path / "risk" / "CURRENT").write_text("2\n")  # promoted behind our back
    predictor.refresh()  # what the server's re-scan does: tries version 2, keeps 1
    after = predictor.predict("risk", 0, x)
    assert not sentinel.exists()
    assert after[1] == 1 and np.array_equal(after[0], before[0])


def _pre():  # type: ignore[no-untyped-def]
    return Preprocessing(("a", "b"), (0.0, 0.0), (1.0, 1.0))


def test_a_pinned_version_keeps_serving_when_newer_ones_register(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    for seed in range(2):
        registry.register("risk", build_model(ModelSpec.resolve([4]), _pre(), seed), target="y")
    registry.promote("risk", 1, pin=True)
    registry.register("risk", build_model(ModelSpec.resolve([4]), _pre(), 3), target="y")
    assert registry.serving_version("risk") == 1 and registry.pinned("risk")
    registry.promote("risk", 3)
    assert registry.serving_version("risk") == 3 and not registry.pinned("risk")


def test_a_registry_removes_what_an_interrupted_register_left(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.register("risk", build_model(ModelSpec.resolve([4]), _pre(), 0), target="y")
    partial = tmp_path / "risk" / ".tmp-deadbeef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    reopened = Registry(tmp_path)
    assert not partial.exists()
    assert reopened.versions("risk") == [1] and reopened.serving_version("risk") == 1


def test_a_reader_registry_leaves_writes_in_progress_alone(tmp_path: Path) -> None:
    Registry(tmp_path).register("risk", build_model(ModelSpec.resolve([4]), _pre(), 0), target="y")
    in_progress = tmp_path / "risk" / ".tmp-another-writer"
    in_progress.mkdir()
    reader = Registry(tmp_path, clean_up=False)
    assert in_progress.exists() and reader.versions("risk") == [1]


def test_writers_in_two_processes_never_take_the_same_version(tmp_path: Path) -> None:
    # Two Registry objects have separate locks, as two processes do: only the rename decides.
    writers = [Registry(tmp_path), Registry(tmp_path)]
    model = build_model(ModelSpec.resolve([4]), _pre(), 0)

    def register_many(registry: Registry) -> list[int]:
        return [registry.register("risk", model, target="y").version for _ in range(6)]

    async def both() -> list[list[int]]:
        return await asyncio.gather(*(asyncio.to_thread(register_many, w) for w in writers))

    taken = [v for versions in asyncio.run(both()) for v in versions]
    assert sorted(taken) == list(range(1, 13))
    reader = Registry(tmp_path, clean_up=False)
    for version in taken:  # every version whole, its metadata naming it
        record = reader.record("risk", version)
        assert record.version == version
        reader.load_weights(record)


def test_a_predictor_follows_another_process_after_a_refresh(tmp_path: Path) -> None:
    writer = Registry(tmp_path)  # another process's view of the shared directory
    writer.register("risk", build_model(ModelSpec.resolve([4]), _pre(), 0), target="y")
    predictor = Predictor(Registry(tmp_path, clean_up=False), CPU)
    x = np.ones((1, 2), np.float32)
    assert predictor.predict("risk", 0, x)[1] == 1
    writer.register("risk", build_model(ModelSpec.resolve([4]), _pre(), 1), target="y")
    assert predictor.predict("risk", 0, x)[1] == 1  # in memory until the re-scan
    assert predictor.predict("risk", 2, x)[1] == 2  # a version not seen yet: read at once
    predictor.refresh()
    assert predictor.predict("risk", 0, x)[1] == 2
    writer.register("fraud", build_model(ModelSpec.resolve([4]), _pre(), 2), target="y")
    assert predictor.predict("fraud", 0, x)[1] == 1  # a new model: found on first ask


# --- the dynamic batcher -------------------------------------------------------------------


@pytest.fixture
def predictor(tmp_path: Path) -> Predictor:
    registry = Registry(tmp_path)
    registry.register("risk", build_model(ModelSpec.resolve([16]), _pre(), 0), target="y")
    return Predictor(registry, CPU)


async def test_concurrent_requests_share_one_forward_pass(predictor: Predictor) -> None:
    batcher = Batcher(predictor, BatchingConfig(max_batch_size=64, max_queue_delay=0.05))
    rows = [np.array([[float(i), -float(i)]], np.float32) for i in range(40)]
    answers = await asyncio.gather(*(batcher.predict("risk", 0, x) for x in rows))
    await batcher.close()
    assert batcher.stats.requests == 40 and batcher.stats.batches < 5
    for x, (out, model) in zip(rows, answers, strict=True):
        expected, version, digest = predictor.predict("risk", 0, x)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        assert model.identity == (version, digest) and out.shape == (1, 1)


async def test_a_bad_row_fails_alone(predictor: Predictor) -> None:
    batcher = Batcher(predictor, BatchingConfig(max_batch_size=8, max_queue_delay=0.05))
    good = np.zeros((1, 2), np.float32)
    results = await asyncio.gather(
        batcher.predict("risk", 0, good),
        batcher.predict("risk", 0, np.zeros((1, 3), np.float32)),
        batcher.predict("risk", 0, good),
        return_exceptions=True,
    )
    await batcher.close()
    assert isinstance(results[0], tuple) and isinstance(results[2], tuple)
    assert isinstance(results[1], InvalidArgument) and "expected [-1, 2]" in results[1].message
    assert batcher.stats.batches == 1


async def test_a_full_queue_refuses_new_requests(predictor: Predictor) -> None:
    batcher = Batcher(predictor, BatchingConfig(max_batch_size=8, max_queue=4))
    x = np.zeros((1, 2), np.float32)
    # All six enqueue before the batching task first runs: the queue holds four.
    results = await asyncio.gather(
        *(batcher.predict("risk", 0, x) for _ in range(6)), return_exceptions=True
    )
    await batcher.close()
    assert [type(r).__name__ for r in results] == ["tuple"] * 4 + ["ResourceExhausted"] * 2
    assert batcher.stats.rejected == 2 and batcher.stats.requests == 4


async def test_expired_requests_are_dropped_before_computing(predictor: Predictor) -> None:
    batcher = Batcher(predictor, BatchingConfig(max_batch_size=64, max_queue_delay=0.05))
    x = np.zeros((1, 2), np.float32)
    results = await asyncio.gather(
        batcher.predict("risk", 0, x, timeout=0.0),
        batcher.predict("risk", 0, x, timeout=5.0),
        return_exceptions=True,
    )
    await batcher.close()
    assert isinstance(results[0], DeadlineExceeded) and isinstance(results[1], tuple)
    assert batcher.stats.expired == 1 and batcher.stats.rows == 1


@pytest.mark.parametrize("writer", ["this process", "another process"])
async def test_a_promoted_version_swaps_in_without_dropping_requests(
    predictor: Predictor, writer: str
) -> None:
    batcher = Batcher(predictor, BatchingConfig(max_batch_size=16, max_queue_delay=0.001))
    x = np.ones((1, 2), np.float32)
    versions: list[int] = []
    asked = 0
    swapped = asyncio.Event()

    async def client() -> None:
        nonlocal asked
        for _ in range(30):
            asked += 1
            _, model = await batcher.predict("risk", 0, x)
            versions.append(model.record.version)
        await swapped.wait()
        asked += 1
        versions.append((await batcher.predict("risk", 0, x))[1].record.version)

    async def promote() -> None:
        while len(versions) < 20:
            await asyncio.sleep(0.001)
        model = build_model(ModelSpec.resolve([16]), _pre(), 9)
        if writer == "this process":
            await asyncio.to_thread(predictor.registry.register, "risk", model, target="y")
        else:  # another process's write, then the server's periodic re-scan
            other = Registry(predictor.registry.root)
            await asyncio.to_thread(other.register, "risk", model, target="y")
            await asyncio.to_thread(predictor.refresh)
        swapped.set()

    await asyncio.gather(*(client() for _ in range(4)), promote())
    await batcher.close()
    assert len(versions) == asked == 124  # every request answered
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions)


# --- the job manager -----------------------------------------------------------------------


async def test_jobs_run_side_by_side_and_report_their_cost(tmp_path: Path) -> None:
    jobs = JobManager(
        Registry(tmp_path / "registry"),
        TableData("t", blobs(600), shards=3),
        CPU,
        progress_interval=0.01,
        workers=2,
        checkpoint_dir=tmp_path / "checkpoints",
    )
    try:
        ids = [
            jobs.start(
                JobRequest(dataset="t", target="label", model_name=f"m{i}", task="multiclass")
            )
            for i in range(2)
        ]
        finals = []
        for job_id in ids:
            finals.append([s async for s in jobs.watch(job_id)][-1])
    finally:
        jobs.close()
    for final in finals:
        assert final.state is JobState.SUCCEEDED, final.message
        assert final.cpu_seconds > 0 and final.gpu_seconds == 0.0
        assert final.bytes_read >= 600 * 4 * 4 and final.device == "cpu"
        assert [h["epoch"] for h in final.history] == [1, 2, 3, 4, 5]
        assert math.isfinite(final.metrics["accuracy"])
    # Finished jobs leave no checkpoints behind.
    assert list((tmp_path / "checkpoints").glob("*/*")) == []


def test_a_full_disk_reads_as_resource_exhausted_and_says_so() -> None:
    for error in (
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ):
        with pytest.raises(ResourceExhausted, match="the disk is full: model 'm' version 2"):
            with checkpoint.disk_errors("model 'm' version 2"):
                raise error
    with pytest.raises(PermissionError):
        with checkpoint.disk_errors("x"):
            raise PermissionError(errno.EACCES, "denied")


async def test_a_job_stopped_by_a_shutdown_resumes_when_the_trainer_returns(
    tmp_path: Path,
) -> None:
    data = TableData("t", blobs(600), shards=3)
    registry = Registry(tmp_path / "registry")
    folders = tmp_path / "checkpoints"
    first = JobManager(registry, data, CPU, progress_interval=0.01, checkpoint_dir=folders)
    request = JobRequest(
        dataset="t", target="binary", model_name="m", epochs=20, batch_size=16,
        checkpoint_every_steps=5,
    )  # fmt: skip
    job_id = first.start(request)
    async for status in first.watch(job_id):
        if status.step >= 40:
            break
    first.close()
    assert first.get(job_id).state is JobState.CANCELLED
    stopped_at = checkpoint.load(folders / job_id / checkpoint.CHECKPOINT).position.step
    assert 0 < stopped_at < 600
    assert registry.names() == []

    second = JobManager(registry, data, CPU, progress_interval=0.01, checkpoint_dir=folders)
    try:
        assert second.recover() == [job_id]
        states = [s async for s in second.watch(job_id)]
    finally:
        second.close()
    final = states[-1]
    assert final.state is JobState.SUCCEEDED, final.message
    # It went on from its checkpoint: no progress report starts below it.
    assert min(s.step for s in states if s.step) >= stopped_at
    assert final.step == final.total_steps == 20 * 3 * 10
    assert registry.versions("m") == [1] and not (folders / job_id).exists()
    # A cancel by the user is final: nothing is left to resume.
    third = JobManager(registry, data, CPU, checkpoint_dir=folders)
    try:
        cancelled = third.start(request)
        third.cancel(cancelled)
        assert [s async for s in third.watch(cancelled)][-1].state is JobState.CANCELLED
        assert not (folders / cancelled).exists()
    finally:
        third.close()
