"""Shared helpers for the benchmarks: timing, peak RSS, isolated runs, the matmul-peak reference, tables.

Every benchmark figure is the median of several timed iterations after warm-up, with min and max
kept beside it, so that a noisy neighbour shows up as spread instead of silently moving the median.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of measurements (``n`` says how many)."""
    if not values:
        raise ValueError("summarize() needs at least one measurement")
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def time_iterations(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` for ``iters`` calls after ``warmup`` untimed calls.

    CPU only: every op has finished when ``fn`` returns, so no device synchronisation is needed.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        result = fn(*args, **kwargs)
        conn.send(("ok", result, peak_rss_mib()))
    except Exception as e:  # noqa: BLE001 - the parent reports any failure of one case and goes on
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}", peak_rss_mib()))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` in a forked child and return ``(result, child's peak RSS in MiB)``.

    A fresh process per case makes peak RSS a per-case figure (``ru_maxrss`` only grows) and keeps
    one case's allocator state and compiled kernels from leaking into the next. The parent must not
    have run torch ops before forking (an OpenMP pool does not survive ``fork``); it only imports.
    Raises ``RuntimeError`` with the child's traceback if the case failed.
    """
    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_conn, fn, args, kwargs))
    proc.start()
    child_conn.close()
    try:
        status, payload, rss = parent_conn.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"benchmark child died without a result (exit code {proc.exitcode}; "
                           f"out of memory?)") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload, rss


def machine_info() -> dict[str, Any]:
    """Facts that make a benchmark result interpretable later."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` are ``(key, header)`` pairs; floats get sensible precision."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths, strict=True)))
              for b in body]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``results`` to ``path`` (default: ``bench/results/bench-<timestamp>.json``)."""
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
