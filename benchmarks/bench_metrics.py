"""Benchmark: every calibration metric on N x K logits, vectorised vs a per-bin loop.

Runs, in one process on the same data (random logits, seed 0, softmax in float32):

* vectorised: one ``wrapcal.metrics.CalibrationMetrics`` update + compute (accuracy, NLL,
  Brier, ECE, adaptive ECE, MCE, class-wise ECE, AURC);
* naive: what a user would write: the same metrics in torch with a Python loop over the
  bins (and over classes x bins for class-wise ECE), a boolean mask and a mean per bin.

Memory is the peak resident set size (RSS) during a phase minus the RSS when it started:
Linux's VmHWM, reset before each phase through ``/proc/self/clear_refs``. Where that
is not possible it falls back to ``getrusage`` max RSS, which cannot be reset, so a phase
that stays below an earlier peak then shows 0. Both include every allocator (torch's CPU
allocations are invisible to tracemalloc).

    python benchmarks/bench_metrics.py            # 1,000,000 x 100
    python benchmarks/bench_metrics.py --n 20000  # quick
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from wrapcal.metrics import CalibrationMetrics

STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS
        return True
    except OSError:
        return False


def measure(
    fn: Callable[[], dict[str, float]],
) -> tuple[dict[str, float], float, float, float, str]:
    """Runs ``fn`` once: (result, wall s, CPU s, peak MB above the starting RSS, method)."""
    resettable = _reset_peak()
    start_rss = _status_kb("VmRSS")
    start_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if resettable and start_rss is not None:
        peak = (_status_kb("VmHWM") or 0) - start_rss
        method = "VmHWM - VmRSS"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_max
        method = "ru_maxrss delta"
    return result, seconds, cpu, peak / 1024, method


def vectorised(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, float]:
    metric = CalibrationMetrics(n_bins)
    metric.update(probs, labels)
    return metric.compute()


def naive(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, float]:
    """The straightforward version: a Python loop over bins, masks and means."""
    n, k = probs.shape
    conf, pred = probs.amax(dim=1), probs.argmax(dim=1)
    correct = (pred == labels).double()
    conf64 = conf.double()
    ece = mce = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        mask = (conf64 > lo) & (conf64 <= hi)
        if mask.any():
            gap = (correct[mask].mean() - conf64[mask].mean()).abs().item()
            ece += mask.double().mean().item() * gap
            mce = max(mce, gap)
    order = torch.argsort(conf)
    adaptive = 0.0
    for group in torch.tensor_split(order, n_bins):
        if len(group):
            gap = (correct[group].mean() - conf64[group].mean()).abs().item()
            adaptive += len(group) / n * gap
    classwise = 0.0
    for c in range(k):
        p = probs[:, c].double()
        hit = (labels == c).double()
        for i in range(n_bins):
            mask = (p > i / n_bins) & (p <= (i + 1) / n_bins)
            if i == 0:
                mask |= p == 0
            if mask.any():
                gap = (hit[mask].mean() - p[mask].mean()).abs().item()
                classwise += mask.double().mean().item() * gap / k
    p_y = probs.gather(1, labels[:, None]).squeeze(1).double()
    onehot = torch.nn.functional.one_hot(labels, k).to(probs.dtype)
    errors = 1 - correct[torch.argsort(conf, descending=True)]
    return {
        "n": n,
        "accuracy": correct.mean().item(),
        "nll": -p_y.clamp_min(torch.finfo(probs.dtype).tiny).log().mean().item(),
        "brier": ((probs - onehot) ** 2).sum(dim=1).double().mean().item(),
        "ece": ece,
        "adaptive_ece": adaptive,
        "mce": mce,
        "classwise_ece": classwise,
        "aurc": (errors.cumsum(0) / torch.arange(1, n + 1)).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="samples (default 1e6)")
    parser.add_argument("--k", type=int, default=100, help="classes (default 100)")
    parser.add_argument("--bins", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.n, args.k, generator=gen) * 3
    labels = torch.randint(args.k, (args.n,), generator=gen)
    # Make the model right often enough that the metrics are not degenerate.
    right = torch.rand(args.n, generator=gen) < 0.6
    labels = torch.where(right, logits.argmax(dim=1), labels)
    probs = torch.softmax(logits, dim=1)
    del logits

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.n:,} x {args.k} float32 probs ({probs.numel() * 4 / 2**20:.0f} MB), "
        f"{args.bins} bins, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}"
    )
    fast, t_fast, c_fast, m_fast, method = measure(lambda: vectorised(probs, labels, args.bins))
    slow, t_slow, c_slow, m_slow, _ = measure(lambda: naive(probs, labels, args.bins))
    print(f"memory: peak RSS above the phase's starting RSS ({method}); CPU = process time")
    print(f"{'':26}{'wall (s)':>10}{'CPU (s)':>10}{'peak (MB)':>11}")
    print(f"{'vectorised (wrapcal)':26}{t_fast:10.2f}{c_fast:10.2f}{m_fast:11.0f}")
    print(f"{'naive per-bin loop':26}{t_slow:10.2f}{c_slow:10.2f}{m_slow:11.0f}")
    print(f"speed-up: {t_slow / t_fast:.1f}x wall, {c_slow / c_fast:.1f}x CPU")
    print(f"{'metric':16}{'wrapcal':>14}{'naive':>14}")
    for name in fast:
        print(f"{name:16}{fast[name]:14.8g}{slow[name]:14.8g}")


if __name__ == "__main__":
    main()
