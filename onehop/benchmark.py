"""The figures every benchmark reports: one value, its baseline from the same run, a goal.

Each module in ``benchmarks/`` exposes ``run(ctx: BenchContext) -> list[Figure]``;
``onehop bench`` runs them, prints one table and writes the JSON.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Goals read "ratio >= 0.9", "ratio <= 1.5", "value <= 512"; anything else is informational.
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


@dataclass
class Figure:
    """One measured figure. ``baseline`` is the same quantity for what a user would
    otherwise run, measured in the same sitting; ``ratio`` is value / baseline, so goals
    read as the issues state them ("ratio >= 0.9" for throughput, "ratio <= 1.5" for a
    latency)."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    goal: str = ""
    conditions: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def passed(self) -> bool | None:
        """True/False against ``goal`` ("ratio >= 0.9", "value <= 512"); None if no goal."""
        parts = self.goal.split()
        if len(parts) != 3 or parts[0] not in ("ratio", "value") or parts[1] not in _COMPARE:
            return None
        subject = self.ratio if parts[0] == "ratio" else self.value
        if subject is None:
            return None
        return _COMPARE[parts[1]](subject, float(parts[2]))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "passed": self.passed}


@dataclass
class BenchContext:
    """What a benchmark module gets: a scratch directory it owns, and how hard to try.

    ``quick`` runs must finish the whole suite in under two minutes on 2 cores: shrink
    sizes and repeats, keep every figure. ``target`` is a running gateway's host:port, or
    empty to start what the benchmark needs itself.
    """

    workdir: Path
    quick: bool = False
    target: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    def record(self, series: str, values: list[float]) -> None:
        """Keep raw samples (latencies, hit rate over time) for the plots."""
        self.samples.setdefault(series, []).extend(values)
