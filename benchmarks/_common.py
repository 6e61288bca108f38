"""Shared helpers for the benchmarks: timing, result files, the final JSON line.

Every benchmark reports throughput as a ratio to a physical baseline measured in the same run
(memcpy, raw lz4, ...), so the numbers survive a change of machine; the absolute GB/s are kept
for context.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_DIR = REPO / "docs" / "benchmarks"


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


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``benchmarks/results/<name>.json`` and ``docs/benchmarks/<name>.md``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS_DIR / f"{name}.json"
    mpath = DOCS_DIR / f"{name}.md"
    jpath.write_text(json.dumps(rounded(data), indent=2, sort_keys=True) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath


def emit_json(data: dict[str, Any]) -> None:
    """Print the one-line JSON result; by convention the last line of a benchmark's stdout."""
    print(json.dumps(rounded(data), sort_keys=True), flush=True)
