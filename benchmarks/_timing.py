"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/...``).

Every benchmark times wrapcal beside what a user would otherwise run, in the same
process, and checks that both sides agree: :func:`best_times` interleaves the runs so
load from other processes hits all of them alike, :func:`machine_line` says what the
figures were measured on, and :class:`Checks` collects the agreement checks, prints
them and gives the exit status (1 when one fails).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "SHARED_DATA",
    "Checks",
    "best_times",
    "import_shared_data",
    "machine_line",
    "median_seconds",
    "threads",
    "timed",
]

SHARED_DATA = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def median_seconds(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), wall seconds)`` of one call."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_times(
    runs: dict[str, Callable[[], object]], repeats: int, warm_up: bool = True
) -> dict[str, float]:
    """Best wall time of each run over ``repeats`` interleaved rounds.

    One round calls every run once, in order, so a burst of load from other processes
    hits all of them alike; the best of the rounds is the least disturbed figure.
    """
    if warm_up:
        for run in runs.values():
            run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run torch and numpy's BLAS on ``count`` threads (0: leave both as they are).

    On a 2-core machine shared with other processes, extra threads mostly wait for each
    other: measured here, scipy's L-BFGS-B on a 2500 x 64 problem took 30 s with
    OpenBLAS's two threads and 0.6 s with one, and torch's temperature fit 10x longer on
    two threads. Every side of a comparison runs under the same setting; both are
    restored on exit.
    """
    if count <= 0:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count):
            yield
    finally:
        torch.set_num_threads(before)


def machine_line() -> str:
    """Library versions, torch threads and the load on the machine, for the header."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_info

    blas = max((pool["num_threads"] for pool in threadpool_info()), default=0)
    line = (
        f"torch {torch.__version__.split('+')[0]}, numpy {np.__version__}, "
        f"{torch.get_num_threads()} torch / {blas} BLAS thread(s), {os.cpu_count()} cores"
    )
    if hasattr(os, "getloadavg"):
        line += ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return line


def import_shared_data():
    """``tests/shared_data`` (the loaders of ``../shared/data``), importable from here."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import shared_data

    return shared_data


class Checks:
    """Agreement checks between wrapcal and its baselines, printed at the end."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        """Record one check: ``name`` passed when ``ok``; ``detail`` gives the figures."""
        self.results.append((name, bool(ok), detail))
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed."""
        return [name for name, ok, _ in self.results if not ok]

    def report(self) -> int:
        """Print every check; return 0 when all passed, else 1 (the exit status)."""
        print("agreement checks:")
        for name, ok, detail in self.results:
            print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
        if self.failed:
            print(f"FAIL: {len(self.failed)} check(s) failed", file=sys.stderr)
            return 1
        return 0
