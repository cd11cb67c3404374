"""Benchmark: MC dropout on the head costs about one forward pass, not T.

Times, in one run on the same batch (timm resnet18, 10 classes, random init, eval mode,
64 images of 3x224x224, CPU, torch's default thread count):

* one deterministic forward pass of the bare model;
* ``wrapped.predict(x)`` with ``MCDropout(samples=30, scope="head")``: the backbone
  once, then 30 dropout samples of the head in one batched call, plus the scores;
* 30 full forward passes of the bare model (what naive MC dropout over the whole
  network costs).

Each figure is the median of a few repeats after one warm-up call. Target: predict at
most 1.3x one forward pass.

Run: ``python benchmarks/bench_mc_dropout.py [--repeats 5] [--full-repeats 2]``
"""

from __future__ import annotations

import argparse
import warnings

import timm
import torch
from _timing import median_seconds  # sibling module: the scripts run from benchmarks/
from wrapcal_plugins.mc_dropout import MCDropout

import wrapcal

TARGET = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30, help="T, the number of samples")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the single calls")
    parser.add_argument("--full-repeats", type=int, default=2, help="repeats of the T passes")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # timm initialises from the global RNG
        model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not trained with dropout": known
        wrapped = wrapcal.wrap(model, [MCDropout(samples=args.samples)]).eval()
    plugin = wrapped.get_plugin(MCDropout)

    def bare() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def full_passes() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(x) for _ in range(args.samples)]

    with torch.no_grad():
        features = wrapped.backbone(x)

    def head_only() -> torch.Tensor:
        with torch.no_grad():
            return wrapped.head_members(features)

    one = median_seconds(bare, args.repeats)
    mc = median_seconds(lambda: wrapped.predict(x), args.repeats)
    head = median_seconds(head_only, args.repeats)
    # The bare forward above warmed the same model up; T passes are long enough as is.
    full = median_seconds(full_passes, args.full_repeats, warm_up=False)

    t = args.samples
    print(
        f"timm resnet18, batch {args.batch}x3x{args.size}x{args.size}, CPU, "
        f"{torch.get_num_threads()} threads, T={t}, p={plugin.p_}, scope=head"
    )
    print(f"  one forward pass (bare)        {one * 1e3:9.1f} ms   1.00x")
    print(f"  {f'MC dropout predict (T={t})':30s} {mc * 1e3:9.1f} ms   {mc / one:.2f}x")
    print(f"    of which T head samples      {head * 1e3:9.1f} ms   {head / one:.3f}x")
    print(f"  {f'{t} full forward passes':30s} {full * 1e3:9.1f} ms   {full / one:.2f}x")
    print(f"  MC predict vs {t} full passes:  {full / mc:.1f}x faster")
    verdict = "meets" if mc / one <= TARGET else "MISSES"
    print(f"  target predict <= {TARGET}x one pass: {verdict} ({mc / one:.2f}x)")


if __name__ == "__main__":
    main()
