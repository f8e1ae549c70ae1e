"""Training checkpoints: the model, the optimiser's state, the RNG and the data position in
one safetensors file, written atomically (temporary file, fsync, rename, fsync of the
directory), so a crash at any moment leaves the previous complete checkpoint in place.

Loading never unpickles: safetensors holds raw tensors plus a JSON header, and a file that is
not one (a torch.save pickle, a torn write) is refused with FailedPrecondition.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from onehop.errors import FailedPrecondition, ResourceExhausted

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "onehop-checkpoint-1"
_META = "onehop"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """A full disk while writing `what` as ResourceExhausted that says so (from Python's
    OSError or safetensors' own error); other failures pass through."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        text = str(exc)
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            mark in text for mark in ("No space left", "StorageFull", "QuotaExceeded")
        )
        if not full:
            raise
        raise ResourceExhausted(
            f"the disk is full: {what} was not written (what was there before is kept); "
            "free space and try again"
        ) from None


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a sibling temporary file, fsync it, rename it over `path`, fsync the
    directory: readers (and a restart after a crash) see the old file or the new, never a
    torn one. A failed write removes its temporary file; a full disk is ResourceExhausted."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with disk_errors(str(path.name)):
            write(tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass
class Position:
    """Where a job stands: `step` optimizer steps done in all, `epoch` (1-based) in progress
    and `epoch_step` steps of it done; epoch-level counters for reports and early stopping."""

    step: int = 0
    epoch: int = 1
    epoch_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    best_val_loss: float = float("inf")
    epochs_without_improvement: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Checkpoint:
    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    # Anything the writer wants checked on resume (spec, hyperparameters, data).
    identity: dict[str, Any]
    # The CUDA generator's state when the job trains on a GPU (dropout masks).
    cuda_rng: torch.Tensor | None = None


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `path` atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in checkpoint.model.items()}
    groups = []
    for index, group in enumerate(checkpoint.optimizer["param_groups"]):
        groups.append({k: v for k, v in group.items()})
        for pid in group["params"]:
            for key, value in checkpoint.optimizer["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{pid}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng"] = checkpoint.rng.contiguous()
    if checkpoint.cuda_rng is not None:
        tensors["rng.cuda"] = checkpoint.cuda_rng.contiguous()
    meta = {
        "format": FORMAT,
        "position": asdict(checkpoint.position),
        "param_groups": groups,
        "identity": checkpoint.identity,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Clone views: safetensors refuses tensors that share storage.
    tensors = {k: v.clone() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)}))


def load(path: Path) -> Checkpoint:
    """The checkpoint at `path`; FailedPrecondition if it is not a complete onehop
    checkpoint (corrupt, truncated, a pickle, another format)."""
    untrusted = FailedPrecondition(
        f"checkpoint {path.name} is corrupt or not a onehop safetensors checkpoint; "
        "start without --resume"
    )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        meta = json.loads(header[_META])
        if meta.get("format") != FORMAT:
            raise untrusted
        position = Position(**meta["position"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError):
        raise untrusted from None
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, _, pid, name = key.split(".", 3)
            state.setdefault(int(pid), {})[name] = value
    return Checkpoint(
        position=position,
        model=model,
        optimizer={"state": state, "param_groups": meta["param_groups"]},
        rng=tensors["rng"],
        identity=meta.get("identity", {}),
        cuda_rng=tensors.get("rng.cuda"),
    )
