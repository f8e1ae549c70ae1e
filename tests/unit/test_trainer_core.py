"""The trainer's cores without any service: training loop, AUC, registry, inference, jobs."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from onehop.errors import FailedPrecondition, InvalidArgument, NotFound
from trainer_service.inference import Predictor
from trainer_service.jobs import JobManager, JobRequest, JobState
from trainer_service.model import ModelSpec, Preprocessing, TabularModel, roc_auc
from trainer_service.registry import Registry
from trainer_service.sources import ShardSource, TableData
from trainer_service.training import (
    Hyperparameters,
    Progress,
    TrainingCancelled,
    TrainingFailed,
    build_model,
    shard_order,
    total_steps,
    train,
)

CPU = torch.device("cpu")


def separable(rows: int, seed: int = 0, features: int = 3) -> pa.Table:
    """Raw features with different scales; the label is a linear rule over them."""
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 50.0, 0.01, 7.0, 3.0])[:features]
    offset = np.array([5.0, -100.0, 0.2, 0.0, 1.0])[:features]
    x = (rng.normal(size=(rows, features)) * scale + offset).astype(np.float32)
    z = ((x - offset) / scale).sum(axis=1)
    columns = {f"f{i}": x[:, i] for i in range(features)}
    columns["label"] = (z > 0).astype(np.int64)
    return pa.table(columns)


def standardised_shards(table: pa.Table, target: str, shards: int = 3) -> list[ShardSource]:
    data = TableData("t", table, shards)
    features = [c for c in table.column_names if c != target]
    with data.open(data.describe("t", 0), [*features, target], target) as sources:
        return sources


def preprocessing_of(table: pa.Table, target: str) -> Preprocessing:
    stats = [c for c in TableData("t", table).columns if c.name != target]
    return Preprocessing(
        tuple(c.name for c in stats), tuple(c.mean for c in stats), tuple(c.std for c in stats)
    )


# --- AUC -----------------------------------------------------------------------------------


def test_auc_matches_hand_computed_examples() -> None:
    # Pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>both: 3 of 4.
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    # A tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4.
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == 0.875
    assert roc_auc(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == 1.0
    assert roc_auc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.9])) == 0.0
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


# --- hyperparameters -----------------------------------------------------------------------


def test_hyperparameter_defaults_follow_the_proto() -> None:
    assert Hyperparameters.resolve() == Hyperparameters(5, 32, 1e-3, 0.2, 0)
    assert ModelSpec.resolve() == ModelSpec(hidden=(64,), dropout=0.5)
    assert ModelSpec.resolve([8, 4], -1.0) == ModelSpec(hidden=(8, 4), dropout=0.0)
    # float32 from the wire: 0.9 stays 0.9.
    assert Hyperparameters.resolve(val_split=float(np.float32(0.9))).val_split == 0.9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 1001}, "epochs"),
        ({"batch_size": 1 << 20}, "batch_size"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"val_split": 0.95}, "val_split"),
        ({"val_split": -0.1}, "val_split"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_hyperparameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"hyperparameters.{field}"):
        Hyperparameters.resolve(**kwargs)


@pytest.mark.parametrize(
    ("hidden", "dropout"), [([0], 0.0), ([8] * 17, 0.0), ([8], 1.0), ([8], float("nan"))]
)
def test_invalid_model_spec_names_the_field(hidden: list[int], dropout: float) -> None:
    with pytest.raises(InvalidArgument, match="model.(hidden|dropout)"):
        ModelSpec.resolve(hidden, dropout)


# --- the training loop ---------------------------------------------------------------------


def test_training_learns_a_separable_problem() -> None:
    table = separable(900)
    shards = standardised_shards(table, "label")
    hp = Hyperparameters.resolve(epochs=4, batch_size=32, lr=1e-2)
    model = build_model(ModelSpec.resolve(), preprocessing_of(table, "label"), hp.seed)
    seen: list[Progress] = []
    # With a long interval only the end-of-epoch reports come.
    result = train(
        model, shards, "label", hp, device=CPU, on_progress=seen.append, progress_interval=1e9
    )

    epoch_ends = [p for p in seen if p.metrics]
    assert len(epoch_ends) == len(seen)
    assert [p.epoch for p in epoch_ends] == [1, 2, 3, 4]
    assert epoch_ends[-1].loss < epoch_ends[0].loss
    assert result.metrics["accuracy"] > 0.8
    assert result.metrics["auc"] > 0.9
    assert result.metrics["loss"] < 0.5
    assert result.steps == total_steps(shards, hp) == 4 * 3 * math.ceil(240 / 32)
    # Every training row once per epoch, counted once.
    assert round(result.samples_per_second * result.elapsed) == 4 * 3 * 240
    assert 0.0 <= result.data_wait_share <= 1.0
    assert result.samples_per_second > 0


def test_training_is_a_function_of_the_seed() -> None:
    table = separable(300, seed=1)
    shards = standardised_shards(table, "label")
    hp = Hyperparameters.resolve(epochs=2, seed=7)
    pre = preprocessing_of(table, "label")
    first, second = build_model(ModelSpec.resolve(), pre, 7), build_model(ModelSpec(), pre, 7)
    train(first, shards, "label", hp, device=CPU)
    train(second, shards, "label", hp, device=CPU)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert sorted(shard_order(5, 7, 1)) == [0, 1, 2, 3, 4]
    assert shard_order(50, 7, 1) == shard_order(50, 7, 1) != shard_order(50, 7, 2)


def test_nan_loss_fails_with_a_clear_message() -> None:
    table = separable(100)
    x = table.column("f0").to_numpy().copy()
    x[:] = np.nan
    shards = [ShardSource.from_table(0, table.set_column(0, "f0", pa.array(x)))]
    model = build_model(ModelSpec.resolve(), preprocessing_of(table, "label"), 0)
    with pytest.raises(TrainingFailed, match="loss became NaN at epoch 1 step 1"):
        train(model, shards, "label", Hyperparameters.resolve(), device=CPU)


def test_non_binary_target_fails_the_shard() -> None:
    table = separable(50).set_column(3, "label", pa.array(np.full(50, 2.0)))
    model = build_model(ModelSpec.resolve(), preprocessing_of(separable(50), "label"), 0)
    with pytest.raises(InvalidArgument, match="binary"):
        train(model, [ShardSource.from_table(0, table)], "label", Hyperparameters(), device=CPU)


def test_cancel_is_checked_between_batches() -> None:
    table = separable(600)
    shards = standardised_shards(table, "label")
    model = build_model(ModelSpec.resolve(), preprocessing_of(table, "label"), 0)
    seen: list[Progress] = []
    # 160 training rows per shard = 5 batches: step 7 is mid-shard, so the next check is the
    # one between two batches.
    with pytest.raises(TrainingCancelled, match="epoch 1 step 7"):
        train(
            model,
            shards,
            "label",
            Hyperparameters.resolve(epochs=3),
            device=CPU,
            on_progress=seen.append,
            should_stop=lambda: bool(seen) and seen[-1].step >= 7,
            progress_interval=0.0,
        )
    assert seen[-1].step == 7


# --- the model's stored preprocessing ------------------------------------------------------


def test_the_model_standardises_raw_features_itself() -> None:
    pre = Preprocessing(("a", "b", "c"), (10.0, -3.0, 0.5), (2.0, 0.5, 0.0))
    model = build_model(ModelSpec.resolve([16]), pre, 3).eval()
    raw = torch.tensor([[12.0, -2.0, 0.5], [8.0, -3.5, 4.0]])
    manual = (raw - torch.tensor(pre.means)) / torch.tensor([2.0, 0.5, 1.0])  # std 0 → 1
    with torch.inference_mode():
        assert torch.allclose(model(raw), model.net(manual))


# --- registry and inference ----------------------------------------------------------------


def trained_model(features: int = 3, seed: int = 0) -> tuple[TabularModel, pa.Table]:
    table = separable(300, seed=seed, features=features)
    shards = standardised_shards(table, "label")
    model = build_model(ModelSpec.resolve([8]), preprocessing_of(table, "label"), seed)
    train(model, shards, "label", Hyperparameters.resolve(epochs=1), device=CPU)
    return model.eval(), table


def raw_features(table: pa.Table, target: str = "label") -> np.ndarray:
    return np.column_stack(
        [table.column(c).to_numpy() for c in table.column_names if c != target]
    ).astype(np.float32)


def test_registry_writes_versions_atomically_with_their_digest(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    model, table = trained_model()
    first = registry.register("risk", model, target="label", dataset="t", dataset_version=1)
    second = registry.register("risk", model, target="label", metrics={"auc": 0.9})

    model_dir = tmp_path / "registry" / "risk"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "CURRENT"]
    assert (first.version, second.version) == (1, 2)
    assert (model_dir / "CURRENT").read_text().strip() == "2"
    weights = (model_dir / "1" / "model.safetensors").read_bytes()
    assert first.weights_digest == hashlib.sha256(weights).hexdigest()
    meta = json.loads((model_dir / "1" / "model.json").read_text())
    assert meta["features"] == ["f0", "f1", "f2"]
    assert meta["weights_digest"] == first.weights_digest
    assert meta["dataset"] == "t" and meta["dataset_version"] == 1
    assert registry.versions("risk") == [1, 2]
    assert registry.record("risk").metrics == {"auc": 0.9}

    x = raw_features(table)
    probabilities, version, digest = Predictor(registry, CPU).predict("risk", 1, x)
    with torch.inference_mode():
        expected = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert np.array_equal(probabilities, expected)
    assert probabilities.shape == (300, 1) and probabilities.dtype == np.float32
    assert (version, digest) == (1, first.weights_digest)


def test_a_new_version_serves_without_restart(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    predictor = Predictor(registry, CPU)
    old, table = trained_model(seed=0)
    registry.register("risk", old, target="label")
    x = raw_features(table)[:5]
    assert predictor.predict("risk", 0, x)[1] == 1
    new, _ = trained_model(seed=1)
    record = registry.register("risk", new, target="label")
    _, version, digest = predictor.predict("risk", 0, x)
    assert (version, digest) == (2, record.weights_digest)


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    predictor = Predictor(registry, CPU)
    model, table = trained_model()
    good = registry.register("risk", model, target="label")
    x = raw_features(table)[:4]
    expected = predictor.predict("risk", 0, x)[0]

    registry.register("risk", model, target="label", promote=False)
    (tmp_path / "risk" / "2" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FailedPrecondition, match="version 2"):
        registry.promote("risk", 2)
    assert registry.serving_version("risk") == 1
    with pytest.raises(FailedPrecondition):
        predictor.predict("risk", 2, x)

    # A broken version that became current anyway: the loaded one keeps answering.
    (tmp_path / "risk" / "CURRENT").write_text("2\n")
    probabilities, version, digest = predictor.predict("risk", 0, x)
    assert (version, digest) == (1, good.weights_digest)
    assert np.array_equal(probabilities, expected)


def test_predict_checks_the_shape_and_the_model(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    predictor = Predictor(registry, CPU)
    model, _ = trained_model(features=5)
    registry.register("risk", model, target="label")
    with pytest.raises(InvalidArgument, match=r"expected \[-1, 5\] got \[4, 4\]"):
        predictor.predict("risk", 0, np.zeros((4, 4), np.float32))
    with pytest.raises(InvalidArgument, match="NaN"):
        predictor.predict("risk", 0, np.full((1, 5), np.nan, np.float32))
    with pytest.raises(NotFound, match="no model 'other'"):
        predictor.predict("other", 0, np.zeros((1, 5), np.float32))
    with pytest.raises(NotFound, match="no version 9"):
        predictor.predict("risk", 9, np.zeros((1, 5), np.float32))
    with pytest.raises(InvalidArgument, match="model name"):
        predictor.predict("../etc", 0, np.zeros((1, 5), np.float32))
    assert predictor.predict("risk", 0, np.zeros((0, 5), np.float32))[0].shape == (0, 1)


# --- the job manager -----------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[JobManager]:
    data = TableData("loans", separable(600), shards=3)
    jobs = JobManager(Registry(tmp_path / "registry"), data, CPU, progress_interval=0.01)
    yield jobs
    jobs.close()


def request(**changes: object) -> JobRequest:
    fields: dict = {"dataset": "loans", "target": "label", "model_name": "risk"}
    fields.update(changes)
    return JobRequest(**fields)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target": "nope"}, "target"),
        ({"target": "f1"}, "target"),  # not binary
        ({"features": ("f0", "nope")}, "features"),
        ({"features": ("f0", "label")}, "features"),
        ({"epochs": 5000}, "hyperparameters.epochs"),
        ({"val_split": 0.99}, "hyperparameters.val_split"),
        ({"model_name": "a/b"}, "model name"),
        ({"dropout": 2.0}, "model.dropout"),
    ],
)
def test_start_rejects_bad_requests_synchronously(
    manager: JobManager, changes: dict, field: str
) -> None:
    with pytest.raises(InvalidArgument, match=field):
        manager.start(request(**changes))
    assert manager.list() == []


def test_unknown_dataset_and_job_are_not_found(manager: JobManager) -> None:
    with pytest.raises(NotFound):
        manager.start(request(dataset="missing"))
    with pytest.raises(NotFound):
        manager.get("nope")
    with pytest.raises(NotFound):
        manager.cancel("nope")


async def test_a_job_trains_registers_and_promotes(manager: JobManager, tmp_path: Path) -> None:
    job_id = manager.start(request(epochs=3, lr=1e-2, features=("f2", "f0", "f1")))
    states = [status async for status in manager.watch(job_id)]
    final = states[-1]
    assert final.state is JobState.SUCCEEDED, final.message
    assert JobState.RUNNING in {s.state for s in states}
    assert final.model_version == 1 and final.epoch == 3 and final.step == final.total_steps
    assert final.metrics["accuracy"] > 0.8
    registry = Registry(tmp_path / "registry")
    record = registry.record("risk")
    assert record.features == ("f2", "f0", "f1")
    assert record.dataset == "loans" and record.dataset_version == 1
    assert registry.serving_version("risk") == 1
    assert manager.get(job_id) == final


async def test_a_nan_job_fails_with_the_reason(tmp_path: Path) -> None:
    # An absurd learning rate blows the weights up after one step.
    jobs = JobManager(Registry(tmp_path), TableData("loans", separable(200)), CPU)
    try:
        job_id = jobs.start(request(lr=1e30))
        final = [s async for s in jobs.watch(job_id)][-1]
    finally:
        jobs.close()
    assert final.state is JobState.FAILED
    assert "loss became" in final.message and "at epoch 1 step" in final.message
    assert Registry(tmp_path).names() == []


async def test_cancel_stops_a_running_job_between_batches(
    manager: JobManager, tmp_path: Path
) -> None:
    job_id = manager.start(request(epochs=1000))
    async for status in manager.watch(job_id):
        if status.state is JobState.RUNNING and status.step > 0:
            manager.cancel(job_id)
        if status.state.terminal:
            break
    final = manager.get(job_id)
    assert final.state is JobState.CANCELLED
    assert 0 < final.step < final.total_steps
    assert Registry(tmp_path / "registry").names() == []


async def test_a_queued_job_cancels_before_it_starts(manager: JobManager) -> None:
    running = manager.start(request(epochs=1000))
    queued = manager.start(request(model_name="second"))
    assert manager.cancel(queued).state is JobState.CANCELLED
    manager.cancel(running)
    assert [s async for s in manager.watch(running)][-1].state is JobState.CANCELLED
    assert manager.get(queued).step == 0
