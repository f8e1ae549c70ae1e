"""The seed model: an MLP for binary classification that carries its own preprocessing.

The feature means and stds of the training dataset version are buffers of the module (saved in
the safetensors file with the weights), so a client sends raw feature values and the model
applies (x - mean) / std itself: training and serving cannot skew.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the MLP, defaults resolved (dropout 0.0 = no dropout layer)."""

    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    dropout: float = DEFAULT_DROPOUT

    @classmethod
    def resolve(cls, hidden: Sequence[int] = (), dropout: float = 0.0) -> ModelSpec:
        """The proto's conventions: empty hidden = [64]; dropout 0 = 0.5, negative = none."""
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
        return cls(hidden=widths, dropout=rate)

    def to_json(self) -> dict:
        return {"hidden": list(self.hidden), "dropout": self.dropout}

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        return cls(hidden=tuple(int(w) for w in data["hidden"]), dropout=float(data["dropout"]))


@dataclass(frozen=True)
class Preprocessing:
    """Feature names in input order and the statistics (x - mean) / std uses."""

    features: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

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
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        if spec.dropout > 0.0:
            layers.append(nn.Dropout(spec.dropout))
        width_in = width
    layers.append(nn.Linear(width_in, 1))
    return nn.Sequential(*layers)


class TabularModel(nn.Module):
    """MLP over standardised features; `forward` takes RAW features and returns logits.

    Training feeds already-standardised data (the data plane applied the same statistics) to
    `self.net`; serving calls the module itself.
    """

    mean: torch.Tensor
    std: torch.Tensor

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
        self.net = build_mlp(n, spec)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(x))

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor the model needs (weights and the preprocessing buffers), on the CPU,
        contiguous: what the registry writes to safetensors."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
