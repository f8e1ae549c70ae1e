"""The trainer's crash faults with real processes: SIGKILL mid-epoch then `--resume`,
SIGKILL while a checkpoint or a registry version is being written, and a 2-process torchrun
(DDP over gloo on the CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from onehop.dataset import credit_default
from trainer_service import checkpoint
from trainer_service.registry import Registry

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "credit.parquet"
    pq.write_table(credit_default(6000), path)
    return path


def train_command(data: Path, registry: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer_service.train",
        "--data",
        str(data),
        "--target",
        "default",
        "--model",
        "risk",
        "--registry",
        str(registry),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--shards",
        "4",
        "--checkpoint-every",
        "25",
        *extra,
    ]


def env() -> dict[str, str]:
    # One intra-op thread: the resumed run's arithmetic matches the uninterrupted one bit
    # for bit whatever else the machine runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def outcome(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_epoch_then_resume_finishes_like_an_uninterrupted_run(
    tmp_path: Path, data_file: Path
) -> None:
    whole = subprocess.run(
        train_command(data_file, tmp_path / "whole"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert whole.returncode == 0, whole.stderr
    expected = outcome(whole.stdout)

    registry = tmp_path / "crashed"
    path = registry.parent / "checkpoints" / "risk" / checkpoint.CHECKPOINT
    child = subprocess.Popen(
        train_command(data_file, registry),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )

    def mid_epoch_two() -> bool:
        try:
            position = checkpoint.load(path).position
        except Exception:  # not written yet, or between our reads
            return False
        return position.epoch == 2 and position.epoch_step > 0

    try:
        wait_for(mid_epoch_two, what="a checkpoint in the middle of epoch 2")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    killed_at = checkpoint.load(path).position
    assert 0 < killed_at.step < expected["steps"]
    assert not (registry / "risk").exists()  # nothing was registered

    resumed = subprocess.run(
        train_command(data_file, registry, "--resume"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    result = outcome(resumed.stdout)
    assert result["steps"] == expected["steps"]
    assert result["metrics"] == expected["metrics"]
    # The same weights, bit for bit: same step, same data order, same dropout stream.
    assert (
        Registry(registry).record("risk").weights_digest
        == Registry(tmp_path / "whole").record("risk").weights_digest
    )


WRITER = """
import sys
from pathlib import Path
import torch
from trainer_service import checkpoint
from trainer_service.checkpoint import Checkpoint, Position
from trainer_service.model import ModelSpec, Preprocessing
from trainer_service.registry import Registry
from trainer_service.training import build_model

target, what = Path(sys.argv[1]), sys.argv[2]
pre = Preprocessing(("a", "b"), (0.0, 0.0), (1.0, 1.0))
for step in range(1, 10_000):
    model = build_model(ModelSpec.resolve([1024, 1024]), pre, step)
    if what == "checkpoint":
        state = Checkpoint(Position(step=step), model.state_dict(), {"state": {}, "param_groups": []},
                           torch.get_rng_state(), {})
        checkpoint.save(target, state)
    else:
        Registry(target).register("risk", model, target="y")
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_last_complete_one(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "checkpoint"], env=env(), cwd=tmp_path
    )
    try:
        wait_for(path.exists, what="the first checkpoint")
        wait_for(lambda: list(tmp_path.glob(".checkpoint.safetensors.*.tmp")), what="a write")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    saved = checkpoint.load(path)  # complete: loads, and its weights are whole
    assert saved.position.step >= 1
    assert saved.model["net.0.weight"].shape == (1024, 2)


def test_sigkill_while_registering_never_serves_a_partial_version(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "registry"], env=env(), cwd=tmp_path
    )
    try:
        wait_for(lambda: (tmp_path / "risk" / "CURRENT").exists(), what="the first version")
        wait_for(lambda: list((tmp_path / "risk").glob(".tmp-*")), what="a version being written")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    registry = Registry(tmp_path)  # reopening clears the interrupted write
    assert list((tmp_path / "risk").glob(".tmp-*")) == []
    record = registry.record("risk")
    model = registry.load_model(record, torch.device("cpu"))  # digest-checked, whole
    assert registry.serving_version("risk") == record.version == registry.versions("risk")[-1]
    assert model.n_features == 2


@pytest.mark.distributed
def test_torchrun_two_ranks_over_gloo_train_and_save_once(tmp_path: Path, data_file: Path) -> None:
    registry = tmp_path / "registry"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "trainer_service.train",
            "--data",
            str(data_file),
            "--target",
            "default",
            "--model",
            "risk",
            "--registry",
            str(registry),
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--lr",
            "0.01",
            "--device",
            "cpu",
        ],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # Its own process group: a hung run is killed with its ranks, not only torchrun.
        start_new_session=True,
    )
    try:
        stdout, stderr = launcher.communicate(timeout=80)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr[-2000:]
    result = outcome(stdout)
    assert result["world_size"] == 2 and result["model_version"] == 1
    losses = result["history_losses"]
    assert losses[-1] < losses[0]
    # Each rank trained half of the 8 shards per epoch: 4 x ceil(600 rows / 64) steps.
    assert result["steps"] == 3 * 4 * 10
    assert Registry(registry).versions("risk") == [1]
