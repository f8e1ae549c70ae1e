"""The figures every benchmark reports: one value, its baseline from the same run, a goal.

Each module in ``benchmarks/`` exposes ``run(ctx: BenchContext) -> list[Figure]``;
``onehop bench`` (onehop/bench.py) runs them, prints one table and writes the JSON. This
file also holds what the modules share: the series names the plots know, the table
printer, and ``run_standalone`` for ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import math
import operator
import sys
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

    ``quick`` runs must finish the whole suite in under two minutes on 2 cores (CI's smoke
    test; aim for 100 s with the machine busy): shrink sizes and repeats, keep every figure.
    Per module that leaves about 12 s (data, cache, training), 15 s (serving, gateway) and
    25 s (before_after), service start-up included: start each process once and reuse it
    where the configuration is the same. ``target`` is a running gateway's host:port, or
    empty to start what the benchmark needs itself.
    """

    workdir: Path
    quick: bool = False
    target: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    # True when this process has a network namespace of its own (`private_network`): the
    # loopback interface's counters then count this benchmark's traffic and nobody else's.
    private_network: bool = False

    def record(self, series: str, values: list[float]) -> None:
        """Keep raw samples (latencies, hit rate over time) for the plots."""
        self.samples.setdefault(series, []).extend(values)

    def thinned(self, most: int = 2000) -> dict[str, list[float]]:
        """Every series cut to at most `most` samples by an even stride, so its order (a
        curve over time) and its distribution survive; the report stays a few MiB where a
        benchmark recorded millions of lookups."""
        return {
            name: values[:: -(-len(values) // most)] if len(values) > most else values
            for name, values in self.samples.items()
        }


# Linux: unshare(2) flag, and the ioctls that read and set an interface's flags.
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def private_network() -> bool:
    """Move this process, and every process it starts from now on, into a network namespace
    of its own with its loopback up, so that bytes counted on the loopback are this
    benchmark's alone. Needs CAP_SYS_ADMIN (root on a plain machine): returns False where
    that is not allowed (most containers), leaving the process where it was. Only the
    calling thread moves: call it before starting services or threads."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import fcntl
    import socket
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        return False
    with socket.socket() as sock:
        flags = struct.unpack(
            "16sh", fcntl.ioctl(sock, _SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0))
        )[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))
    return True


# --- series the plots know (benchmarks/plots.py) ---------------------------------------------
# ctx.record(series(KIND, label), values): the plots draw every series of these kinds, one
# line per label in one panel per module, so "latency_ms/hit" and "latency_ms/miss" meet.
LATENCY_MS = "latency_ms"  # one request's latency, ms
LOSS = "loss"  # training loss per progress update
DATA_WAIT = "data_wait_share"  # share of training time spent waiting on data, per update
HIT_RATE = "hit_rate"  # hit rate of consecutive windows of requests, in order
THROUGHPUT = "throughput_rps"  # requests/s at the concurrency of the same index in ...
CONCURRENCY = "concurrency"  # ... "concurrency/<label>": the x axis of the throughput plot


def series(kind: str, label: str) -> str:
    """The name under which the plots find a series: ``series(LATENCY_MS, "hit")``."""
    return f"{kind}/{label}"


# --- the table --------------------------------------------------------------------------------


def format_number(value: float | None) -> str:
    """Three significant figures, thousands separated; '—' for no value."""
    if value is None or math.isnan(value):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.3g}"


def verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "—"}[passed]


TABLE_HEADER = ("figure", "onehop", "baseline", "ratio", "goal", "result")


def table_rows(figures: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row of text per figure object (``Figure.to_json()`` plus an optional ``error``)."""
    rows: list[tuple[str, ...]] = []
    for fig in figures:
        if fig.get("error"):
            rows.append((fig["name"], "error", "—", "—", fig.get("goal") or "—", "FAIL"))
            continue
        unit = f" {fig['unit']}" if fig.get("unit") else ""
        baseline = "—"
        if fig.get("baseline") is not None:
            baseline = format_number(fig["baseline"]) + unit
            if fig.get("baseline_name"):
                baseline += f" ({fig['baseline_name']})"
        ratio = fig.get("ratio")
        rows.append(
            (
                fig["name"],
                format_number(fig["value"]) + unit,
                baseline,
                "—" if ratio is None else f"{ratio:.2f}×",
                fig.get("goal") or "—",
                verdict(fig.get("passed")),
            )
        )
    return rows


def format_table(figures: list[dict[str, Any]]) -> str:
    """The aligned text table `onehop bench` prints; failed modules' errors follow it."""
    rows = [TABLE_HEADER, *table_rows(figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    errors = [f"  {fig['name']}: {fig['error']}" for fig in figures if fig.get("error")]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def print_figures(figures: list[Figure]) -> None:
    print(format_table([figure.to_json() for figure in figures]), flush=True)


def run_standalone(
    run: Callable[[BenchContext], list[Figure]], argv: list[str] | None = None
) -> int:
    """`python -m benchmarks.<name> [--quick] [--target HOST:PORT]`: one module alone, in a
    temporary working directory, its figures printed as `onehop bench` prints them."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=(run.__doc__ or "").strip() or None)
    parser.add_argument("--quick", action="store_true", help="small sizes, every figure")
    parser.add_argument("--target", default="", help="a running gateway's host:port")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onehop-bench-") as workdir:
        ctx = BenchContext(Path(workdir), quick=args.quick, target=args.target)
        # A running mesh (--target) is on the host's network: stay there for it.
        ctx.private_network = not args.target and private_network()
        print_figures(run(ctx))
    return 0
