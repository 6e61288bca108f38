"""Shared helpers for the benchmarks: timing, result files, the final JSON line.

Every benchmark reports throughput as a ratio to a physical baseline measured in the same run
(memcpy, raw lz4, ...), so the numbers survive a change of machine; the absolute GB/s are kept
for context.

The recorded results (``benchmarks/results/*.json``, ``docs/benchmarks/*.md``, which the README
links to) are written only by full runs or with ``--record``: a ``--quick`` check writes to
``.cache/bench/`` (or ``--results-dir``) and says so, so it never replaces full-run figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_DIR = REPO / "docs" / "benchmarks"
#: where runs that are not recorded (``--quick`` without ``--record``) write (git-ignored)
SCRATCH_DIR = REPO / ".cache" / "bench"


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_gbps(
    fn: Callable[[], Any],
    nbytes: int,
    repeat: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    clock: str = "wall",
) -> float:
    """GB/s (1e9 bytes/s) of ``fn`` moving ``nbytes``: the median of ``repeat`` timed calls.

    Median, not best: one lucky run should not set a figure others are compared against. With
    ``min_time`` > 0, keeps repeating until that many seconds were spent (fast functions).
    ``clock="cpu"`` times the calling thread's CPU time (for single-threaded work on a shared,
    overloaded machine, where wall time measures the neighbours more than the code).
    """
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeat or spent < min_time:
        t0 = now()
        fn()
        dt = now() - t0
        times.append(dt)
        spent += dt
        if len(times) >= 10_000:
            break
    med = statistics.median(times)
    return nbytes / med / 1e9 if med > 0 else math.inf


def rounded(obj: Any, digits: int = 4) -> Any:
    """Round floats for readable JSON (significant digits, keeps small errors visible)."""
    if isinstance(obj, float):
        if obj == 0 or not math.isfinite(obj):
            return obj if math.isfinite(obj) else None
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], first: str = "") -> str:
    """A GitHub markdown table; ``first`` names the column holding each row's ``_name``."""
    head = ([first] if first else []) + list(columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [str(r.get("_name", ""))] if first else []
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_output_args(ap: argparse.ArgumentParser) -> None:
    """``--record`` and ``--results-dir``, the two ways to say where a run's results go."""
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--record", action="store_true",
                   help="update the recorded results (benchmarks/results, docs/benchmarks) even from a --quick run")
    g.add_argument("--results-dir", type=Path, default=None,
                   help=f"write the results here instead (default: the record for a full run, "
                        f"{SCRATCH_DIR.relative_to(REPO)}/ for --quick)")


def output_dirs(args: argparse.Namespace | None = None) -> tuple[Path, Path]:
    """(JSON dir, markdown dir) of this run: the record for a full run or ``--record``, else
    ``--results-dir`` or ``.cache/bench/``. Without ``args`` (a benchmark that does not use
    ``add_output_args``), a ``--quick`` in the command line is enough to stay off the record."""
    if args is None:
        argv = sys.argv[1:]
        record, quick, out = "--record" in argv, "--quick" in argv, None
    else:
        record, quick, out = getattr(args, "record", False), getattr(args, "quick", False), getattr(
            args, "results_dir", None)
    if record or (out is None and not quick):
        return RESULTS_DIR, DOCS_DIR
    d = Path(out) if out is not None else SCRATCH_DIR
    return d, d


def write_results(name: str, data: dict[str, Any], markdown: str,
                  args: argparse.Namespace | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` where ``output_dirs(args)`` says (the recorded
    ``benchmarks/results/`` and ``docs/benchmarks/`` only for a full run or ``--record``) and
    say where on stderr (stdout's last line stays the JSON result)."""
    jdir, mdir = output_dirs(args)
    jdir.mkdir(parents=True, exist_ok=True)
    mdir.mkdir(parents=True, exist_ok=True)
    jpath = jdir / f"{name}.json"
    mpath = mdir / f"{name}.md"
    jpath.write_text(json.dumps(rounded(data), indent=2, sort_keys=True) + "\n")
    mpath.write_text(markdown)
    note = "" if jdir == RESULTS_DIR else " (not the recorded results, which --record updates)"
    print(f"{name}: results written to {jpath} and {mpath}{note}", file=sys.stderr, flush=True)
    return jpath, mpath


def emit_json(data: dict[str, Any]) -> None:
    """Print the one-line JSON result; by convention the last line of a benchmark's stdout."""
    print(json.dumps(rounded(data), sort_keys=True), flush=True)
