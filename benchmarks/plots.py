"""The report's plots, drawn from `onehop bench --json` output: latency distributions (hit vs
miss), training curves with the data-wait share, hit rate over time, throughput against
concurrency. Each chart has one panel per module that recorded its kind of series (series
names are ``kind/label``, see onehop.benchmark).

    python -m benchmarks.plots REPORT.json OUT_DIR   # prints the PNGs it wrote
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from onehop.benchmark import CONCURRENCY, DATA_WAIT, HIT_RATE, LATENCY_MS, LOSS, THROUGHPUT


def by_module(
    samples: dict[str, dict[str, list[float]]], kind: str
) -> dict[str, dict[str, list[float]]]:
    """Every series of one kind, by the module that recorded it: {module: {label: values}}."""
    found: dict[str, dict[str, list[float]]] = {}
    for module, recorded in samples.items():
        for name, values in recorded.items():
            if name.startswith(f"{kind}/") and values:
                found.setdefault(module, {})[name.split("/", 1)[1]] = values
    return found


def _panels(title: str, modules: list[str], rows_each: int = 1) -> tuple[Any, Any]:
    """One figure, `rows_each` stacked panels per module."""
    import matplotlib.pyplot as plt

    rows = len(modules) * rows_each
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.4 * rows), squeeze=False)
    fig.suptitle(title)
    return fig, axes[:, 0]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency(samples: dict, out: Path) -> Path | None:
    """The cumulative distribution of request latency, one line per path (hit, miss, …)."""
    found = by_module(samples, LATENCY_MS)
    if not found:
        return None
    fig, axes = _panels("Request latency: hit vs miss path", list(found))
    for ax, (module, series) in zip(axes, found.items(), strict=True):
        for label, values in sorted(series.items()):
            ordered = np.sort(values)
            share = np.arange(1, len(ordered) + 1) / len(ordered)
            p50 = np.median(ordered)
            ax.step(ordered, share, where="post", label=f"{label} (p50 {p50:.3g} ms)")
        ax.set_title(module, fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("share of requests ≤ x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "latency.png")


def training(samples: dict, out: Path) -> Path | None:
    """Per module: loss per progress update, then the share of time spent waiting on data."""
    losses, waits = by_module(samples, LOSS), by_module(samples, DATA_WAIT)
    modules = sorted(set(losses) | set(waits))
    if not modules:
        return None
    fig, axes = _panels("Training: loss and data-wait share", modules, rows_each=2)
    for i, module in enumerate(modules):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        for label, values in sorted(losses.get(module, {}).items()):
            top.plot(values, label=label)
        top.set_title(module, fontsize=10)
        top.set_ylabel("training loss")
        for label, values in sorted(waits.get(module, {}).items()):
            bottom.plot(100 * np.asarray(values), label=label)
        bottom.set_ylabel("data wait (% of time)")
        bottom.set_xlabel("progress update")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    return _save(fig, out / "training.png")


def hit_rate(samples: dict, out: Path) -> Path | None:
    found = by_module(samples, HIT_RATE)
    if not found:
        return None
    fig, axes = _panels("Cache hit rate over time", list(found))
    for ax, (module, series) in zip(axes, found.items(), strict=True):
        for label, values in sorted(series.items()):
            x = np.linspace(0, 100, len(values))
            ax.plot(
                x, 100 * np.asarray(values), marker="." if len(values) <= 50 else "", label=label
            )
        ax.set_title(module, fontsize=10)
        ax.set_xlabel("progress through the request sequence (%)")
        ax.set_ylabel("hit rate (%)")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "hit_rate.png")


def throughput(samples: dict, out: Path) -> Path | None:
    rates, levels = by_module(samples, THROUGHPUT), by_module(samples, CONCURRENCY)
    found = {
        module: {
            label: (levels[module][label], values)
            for label, values in series.items()
            if label in levels.get(module, {})
        }
        for module, series in rates.items()
    }
    found = {module: pairs for module, pairs in found.items() if pairs}
    if not found:
        return None
    fig, axes = _panels("Throughput against concurrency", list(found))
    for ax, (module, pairs) in zip(axes, found.items(), strict=True):
        for label, (x, y) in sorted(pairs.items()):
            ax.plot(x, y, marker="o", label=label)
        ax.set_title(module, fontsize=10)
        ax.set_xscale("log", base=2)
        ticks = sorted({level for x, _ in pairs.values() for level in x})
        ax.set_xticks(ticks, [f"{level:g}" for level in ticks])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("requests/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "throughput.png")


def draw(report: dict[str, Any], out: Path) -> list[Path]:
    """Every plot the report has samples for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out.mkdir(parents=True, exist_ok=True)
    samples = report.get("samples", {})
    drawn = [plot(samples, out) for plot in (latency, training, hit_rate, throughput)]
    return [path for path in drawn if path is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="JSON written by `onehop bench --json`")
    parser.add_argument("out", type=Path, help="directory for the PNG files")
    args = parser.parse_args(argv)
    for path in draw(json.loads(args.report.read_text()), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
