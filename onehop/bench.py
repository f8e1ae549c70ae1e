"""`onehop bench`: run every module of ``benchmarks/``, print one table, write the JSON, the
plots and the README's performance section.

Each module runs in a child process of its own (``python -m onehop.bench NAME WORKDIR``) with
a fresh working directory, so a module that fails, hangs or leaves threads behind costs only
its own rows: it becomes a failed row and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onehop import __version__
from onehop.benchmark import (
    TABLE_HEADER,
    BenchContext,
    format_table,
    private_network,
    table_rows,
)
from onehop.errors import InvalidArgument

# The order the table shows; each is benchmarks/<name>.py with run(ctx) -> list[Figure].
MODULES = ("data", "cache", "training", "serving", "gateway", "before_after")
ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# A module past this is stopped (SIGTERM, so it can stop what it started) and reported failed.
QUICK_TIMEOUT_SECONDS = 120.0
FULL_TIMEOUT_SECONDS = 1800.0
# How long a stopped module gets to stop its own services before it is killed.
STOP_GRACE_SECONDS = 30.0


@dataclass
class ModuleResult:
    name: str
    status: str  # ok | failed | missing
    seconds: float = 0.0
    figures: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    error: str = ""

    def rows(self) -> list[dict[str, Any]]:
        """Its figures; a module that did not run is one failed row under its own name."""
        if self.status == "ok":
            return [{"module": self.name, **figure} for figure in self.figures]
        return [
            {
                "module": self.name,
                "name": self.name,
                "value": None,
                "unit": "",
                "baseline": None,
                "baseline_name": "",
                "ratio": None,
                "goal": "",
                "passed": False,
                "conditions": {},
                "error": self.error,
            }
        ]


def machine() -> dict[str, Any]:
    """What the figures were measured on, for the report and the README."""
    import psutil
    import torch

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return {
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "onehop": __version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --- running the modules ------------------------------------------------------------------


def run_module(
    name: str, root: Path, quick: bool, target: str, timeout: float | None = None
) -> ModuleResult:
    """One module in a child process with ``root/name`` as its working directory."""
    if not (BENCHMARKS / f"{name}.py").is_file():
        return ModuleResult(name, "missing", error=f"benchmarks/{name}.py does not exist")
    workdir = root / name
    workdir.mkdir(parents=True)
    result_path, log_path = root / f"{name}.json", root / f"{name}.log"
    command = [sys.executable, "-m", "onehop.bench", name, str(workdir), str(result_path)]
    command += ["--quick"] if quick else []
    command += ["--target", target] if target else []
    timeout = timeout or (QUICK_TIMEOUT_SECONDS if quick else FULL_TIMEOUT_SECONDS)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            command,
            cwd=workdir,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches this process, which stops the child in order.
            start_new_session=True,
        )
        try:
            code = child.wait(timeout)
            error = "" if code == 0 else _last_line(log_path) or f"exited with code {code}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
            _stop(child)
        except BaseException:
            _stop(child)
            raise
    seconds = time.perf_counter() - started
    if error:
        return ModuleResult(name, "failed", seconds, error=error)
    data = json.loads(result_path.read_text())
    return ModuleResult(name, "ok", seconds, data["figures"], data["samples"])


def _child_env() -> dict[str, str]:
    """This environment with the checkout on the path: benchmarks/ is not an installed package."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM (the module stops what it started), then SIGKILL after the grace."""
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _last_line(log_path: Path) -> str:
    """The last line of a failed module's output: the exception, for a traceback."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _finite(value: Any) -> Any:
    """NaN and infinities become null: the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_all(
    names: list[str], quick: bool, target: str = "", say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every named module in order, each in a fresh temporary directory: the report."""
    results = []
    with tempfile.TemporaryDirectory(prefix="onehop-bench-") as root:
        for name in names:
            say(f"bench {name} …")
            result = run_module(name, Path(root), quick, target)
            if result.status != "ok":
                log = Path(root) / f"{name}.log"
                tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
                say("\n".join([f"bench {name} {result.status}: {result.error}", *tail]))
            else:
                say(f"bench {name} done in {result.seconds:.1f} s")
            results.append(result)
    return _finite(
        {
            "command": " ".join(
                ["onehop bench", *(["--quick"] if quick else [])]
                + ([] if names == list(MODULES) else ["--only", ",".join(names)])
            ),
            "quick": quick,
            "machine": machine(),
            "figures": [row for result in results for row in result.rows()],
            "modules": [
                {
                    "name": r.name,
                    "status": r.status,
                    "seconds": round(r.seconds, 2),
                    "error": r.error,
                }
                for r in results
            ],
            "samples": {r.name: r.samples for r in results if r.samples},
        }
    )


# --- reporting -------------------------------------------------------------------------------


def describe_machine(info: dict[str, Any]) -> str:
    cpu = f"{info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB RAM"
    device = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    commit = f" at {info['commit']}" if info.get("commit") else ""
    return (
        f"{cpu}, {device}; torch {info['torch']}, Python {info['python']}, {info['os']}; "
        f"onehop {info['onehop']}{commit}; {info['date']}"
    )


def markdown(
    report: dict[str, Any], plots: list[Path] | None = None, base: Path | None = None
) -> str:
    """The README's performance section: the table, the machine, the command, the plots."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        f"Measured with `{report['command']}` on {describe_machine(report['machine'])}.",
        "Each ratio is onehop / the baseline measured in the same run.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in table_rows(report["figures"])
    ]
    errors = [f for f in report["figures"] if f.get("error")]
    if errors:
        lines += ["", *[f"- `{f['name']}` did not run: {cell(f['error'])}" for f in errors]]
    for plot in plots or []:
        shown = os.path.relpath(plot, base) if base else str(plot)
        lines += ["", f"![{plot.stem.replace('_', ' ')}]({shown})"]
    return "\n".join(lines) + "\n"


def draw_plots(report_path: Path, out_dir: Path) -> list[Path]:
    """benchmarks/plots.py over a saved report (in a child: benchmarks/ is not installed)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plots", str(report_path), str(out_dir)],
        env=_child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"drawing the plots failed: {lines[-1] if lines else done.returncode}")
    return [Path(line) for line in done.stdout.splitlines() if line.strip()]


def command(args: argparse.Namespace) -> int:
    """`onehop bench`: run (or, with --from-json, reload) the report, then print and write it."""
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        names = [n for part in args.only or [] for n in part.split(",") if n] or list(MODULES)
        unknown = sorted(set(names) - set(MODULES))
        if unknown:
            raise InvalidArgument(f"unknown benchmark(s) {unknown}; known: {', '.join(MODULES)}")
        report = run_all(
            names,
            args.quick,
            args.target,
            say=lambda line: print(line, file=sys.stderr, flush=True),
        )
    print(f"onehop bench — {describe_machine(report['machine'])}")
    print(format_table(report["figures"]), flush=True)

    json_path = Path(args.json) if args.json else None
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    plots: list[Path] = []
    failed = [m["name"] for m in report["modules"] if m["status"] != "ok"]
    if args.plots:
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "report.json"
            source.write_text(json.dumps(report))
            try:
                plots = draw_plots(source, Path(args.plots))
                print(f"plots: {', '.join(map(str, plots)) or 'none (no samples recorded)'}")
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed.append("plots")
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Image paths from the current directory: the section goes into the README there.
        path.write_text(markdown(report, plots, base=Path.cwd()))
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes (< 2 min on 2 cores)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--plots", metavar="DIR", help="draw the PNG plots into DIR")
    parser.add_argument(
        "--markdown",
        metavar="FILE",
        help="write the README's performance section (plot paths relative to this directory)",
    )
    parser.add_argument(
        "--target",
        default="",
        metavar="HOST:PORT",
        help="a running gateway, where a module can use one",
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME", help=f"run only these ({', '.join(MODULES)})"
    )
    parser.add_argument(
        "--from-json", metavar="PATH", help="report a saved JSON instead of running the benchmarks"
    )


# --- the child process ------------------------------------------------------------------------


def _worker(argv: list[str]) -> int:
    """Run one module; write its figures and samples to the result path."""
    parser = argparse.ArgumentParser(prog="python -m onehop.bench")
    parser.add_argument("name")
    parser.add_argument("workdir", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--target", default="")
    args = parser.parse_args(argv)
    # SIGTERM from the runner unwinds the module, so its `finally` stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Before anything starts a thread; a running mesh (--target) is on the host's network.
    isolated = not args.target and private_network()
    module = importlib.import_module(f"benchmarks.{args.name}")
    ctx = BenchContext(args.workdir, args.quick, args.target, private_network=isolated)
    figures = module.run(ctx)
    args.result.write_text(
        json.dumps(_finite({"figures": [f.to_json() for f in figures], "samples": ctx.thinned()}))
    )
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
