"""The model: an MLP for tabular data that carries its own preprocessing.

The feature means and stds of the training dataset version are buffers of the module (saved in
the safetensors file with the weights), so a client sends raw feature values and the model
applies (x - mean) / std itself: training and serving cannot skew. A regression model also
keeps the target's mean and std and answers in the target's units.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onehop.errors import InvalidArgument

DEFAULT_HIDDEN = (64,)
DEFAULT_DROPOUT = 0.5
MAX_LAYERS = 16
MAX_WIDTH = 65_536
MAX_CLASSES = 10_000

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}
TASKS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the MLP, defaults resolved (dropout 0.0 = no dropout layer).

    `classes` is the number of classes of a multiclass model (0 for the other tasks); the
    job reads it from the target column's range.
    """

    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    dropout: float = DEFAULT_DROPOUT
    activation: str = "relu"
    task: str = "binary"
    classes: int = 0

    @classmethod
    def resolve(
        cls,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "",
        task: str = "",
        classes: int = 0,
    ) -> ModelSpec:
        """The proto's conventions: empty hidden = [64]; dropout 0 = 0.5, negative = none;
        "" = relu / binary. Errors name the field."""
        widths = tuple(int(w) for w in hidden) or DEFAULT_HIDDEN
        if len(widths) > MAX_LAYERS:
            raise InvalidArgument(f"model.hidden: at most {MAX_LAYERS} layers, got {len(widths)}")
        for width in widths:
            if not 1 <= width <= MAX_WIDTH:
                raise InvalidArgument(
                    f"model.hidden: layer widths must be 1..{MAX_WIDTH}, got {width}"
                )
        if math.isnan(dropout) or dropout >= 1.0:
            raise InvalidArgument(f"model.dropout must be below 1 (negative = none), got {dropout}")
        if dropout == 0.0:
            rate = DEFAULT_DROPOUT
        elif dropout < 0.0:
            rate = 0.0
        else:
            rate = float(dropout)
        activation = activation or "relu"
        if activation not in ACTIVATIONS:
            raise InvalidArgument(
                f"model.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        task = task or "binary"
        if task not in TASKS:
            raise InvalidArgument(f"model.task must be one of {list(TASKS)}, got {task!r}")
        if task == "multiclass" and not 2 <= classes <= MAX_CLASSES:
            raise InvalidArgument(
                f"model.task multiclass needs 2..{MAX_CLASSES} classes, got {classes}"
            )
        return cls(widths, rate, activation, task, classes if task == "multiclass" else 0)

    @property
    def outputs(self) -> int:
        """Width of the last layer: one logit (binary), one per class, one value."""
        return self.classes if self.task == "multiclass" else 1

    def to_json(self) -> dict:
        return {
            "hidden": list(self.hidden),
            "dropout": self.dropout,
            "activation": self.activation,
            "task": self.task,
            "classes": self.classes,
        }

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        return cls(
            hidden=tuple(int(w) for w in data["hidden"]),
            dropout=float(data["dropout"]),
            activation=str(data.get("activation", "relu")),
            task=str(data.get("task", "binary")),
            classes=int(data.get("classes", 0)),
        )


@dataclass(frozen=True)
class Preprocessing:
    """Feature names in input order and the statistics (x - mean) / std uses; for a
    regression model also the target's (the net learns the standardised target)."""

    features: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self) -> None:
        if len(self.means) != len(self.features) or len(self.stds) != len(self.features):
            raise ValueError("one mean and one std per feature")


def safe_std(std: float) -> float:
    """A constant (or statistics-less) column is centred but not scaled: dividing by 0 would
    turn every value into inf/NaN."""
    return std if math.isfinite(std) and std > 0.0 else 1.0


def build_mlp(n_features: int, spec: ModelSpec) -> nn.Sequential:
    layers: list[nn.Module] = []
    width_in = n_features
    for width in spec.hidden:
        layers += [nn.Linear(width_in, width), ACTIVATIONS[spec.activation]()]
        if spec.dropout > 0.0:
            layers.append(nn.Dropout(spec.dropout))
        width_in = width
    layers.append(nn.Linear(width_in, spec.outputs))
    return nn.Sequential(*layers)


class TabularModel(nn.Module):
    """MLP over standardised features; `forward` takes RAW features and returns the net's
    raw outputs (logits, or the standardised target); `predict` turns them into answers.

    Training feeds already-standardised data (the data plane applied the same statistics) to
    `self.net`; serving calls `predict`.
    """

    mean: torch.Tensor
    std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, spec: ModelSpec, preprocessing: Preprocessing):
        super().__init__()
        self.spec = spec
        self.features = preprocessing.features
        n = len(preprocessing.features)
        if n == 0:
            raise InvalidArgument("features: a model needs at least one feature column")
        self.register_buffer("mean", torch.tensor(preprocessing.means, dtype=torch.float32))
        self.register_buffer(
            "std", torch.tensor([safe_std(s) for s in preprocessing.stds], dtype=torch.float32)
        )
        if spec.task == "regression":
            self.register_buffer("target_mean", torch.tensor(preprocessing.target_mean))
            self.register_buffer("target_std", torch.tensor(safe_std(preprocessing.target_std)))
        self.net = build_mlp(n, spec)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def preprocessing(self) -> Preprocessing:
        regression = self.spec.task == "regression"
        return Preprocessing(
            self.features,
            tuple(float(v) for v in self.mean.detach().cpu()),
            tuple(float(v) for v in self.std.detach().cpu()),
            float(self.target_mean) if regression else 0.0,
            float(self.target_std) if regression else 1.0,
        )

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Answers for RAW features: probabilities (binary [n, 1], multiclass [n, K]) or the
        predicted value [n, 1] in the target's units; float32."""
        out = self(x).float()
        if self.spec.task == "binary":
            return torch.sigmoid(out)
        if self.spec.task == "multiclass":
            return torch.softmax(out, dim=1)
        return out * self.target_std + self.target_mean

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor the model needs (weights and the preprocessing buffers), on the CPU,
        contiguous: what the registry writes to safetensors."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}


def select_device(name: str = "auto") -> torch.device:
    """ "auto" = CUDA when present (this process's local rank under torchrun), else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op thread count for this process and return it: `requested` when
    positive, else OMP_NUM_THREADS when set (torchrun sets 1 per rank), else one per core
    but one, left to the prefetch thread and the RPC server. Small MLP steps gain little
    from intra-op threads, and threads that outnumber free cores wait on each other at every
    operator (measured 30x slower on 2 busy cores)."""
    if requested <= 0:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        requested = max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(requested)
    return requested


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties averaged.

    NaN when only one class is present (the AUC is undefined).
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average 1-based rank of each run of equal scores.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    run_ranks = first + (counts + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, counts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
