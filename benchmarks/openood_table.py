"""OpenOOD-style table: every OOD score of wrapcal on every OOD set at hand, ResNet-20.

Protocol (OpenOOD v1.5's post-hoc protocol, Zhang et al. 2023, on what this machine
has): the shared third-party CIFAR-10 ResNet-20, unchanged; every detector fitted on the
10000 JPEG CIFAR-10 training images only (no OOD data, no tuning on OOD data); the
``ood`` decision's conformal p-values calibrated on half A of the JPEG test set
(``np.random.default_rng(0)``'s permutation, 5000 images); every score measured on half
B (5000 in-distribution images) against each OOD set of ``benchmarks/_ood_sets.py``
(2000 images each; the jigsaw and shuffled-pixel sets are made of half B's images),
grouped near / far as OpenOOD groups them. In-distribution is the positive class;
FPR@95 is the share of OOD images accepted when 95% of in-distribution images are.

Rows: every OOD or uncertainty score the registered detectors give at their defaults
(one wrapped model holds them all: each detector reads the model's own features and
head, so it scores as it would alone), the core's ``msp``, ``max_logit``, ``energy`` and
``entropy``, and the combined ``ood`` score; ranked by mean AUROC over the near and far
means. The last lines give ``is_ood``'s share of flagged in-distribution images at
several ``alpha`` beside ``alpha``.

Run: ``python benchmarks/openood_table.py [--n 2000] [--markdown table.md]`` (needs
``../shared/data``; a few minutes on 2 cores, most of it ODIN's gradient passes).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _ood_sets import GROUPS, ood_sets
from _timing import SHARED_DATA, machine_line
from shared_data import cifar10, pretrained_resnet20

import wrapcal
from wrapcal import OutputKind, Stage, get_tags
from wrapcal.metrics import auroc, fpr_at_tpr

#: Scores of the core every wrapped model has.
CORE_SCORES = ("msp", "max_logit", "energy", "entropy")
#: Plugins that are detectors but need more than ID data, or are not post-hoc.
NOT_POST_HOC = {
    "discrepancy": "trains two heads on unlabelled traffic",
    "ensemble": "the disagreement of several checkpoints: 0 on one network",
}


def detectors() -> list[str]:
    """Registered DETECT-stage plugins that give an OOD score at their defaults."""
    names = []
    for name, info in sorted(wrapcal.plugin_registry().items()):
        if name in NOT_POST_HOC:
            continue
        try:
            tags = get_tags(info.factory())
        except Exception:  # a plugin that needs arguments cannot run at its defaults
            continue
        if tags.stage is Stage.DETECT and OutputKind.OOD_SCORE in tags.outputs.values():
            names.append(name)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images per OOD set")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    if not (SHARED_DATA / "cifar10_jpeg.npz").is_file():
        print(f"needs the shared data in {SHARED_DATA}; nothing to measure")
        return 0
    print(machine_line())
    x_train, y_train = cifar10("train")
    x_test, y_test = cifar10("test")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y_test)))
    half_a, half_b = perm[:5000], perm[5000:]
    names = detectors()
    with_decision = "ood" in wrapcal.plugin_registry()
    plugins: list = [*names, *(["ood"] if with_decision else [])]
    print(f"detectors: {', '.join(names)}" + (" + the ood decision" if with_decision else ""))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plugins that do not read a set say so
        wrapped = wrapcal.wrap(pretrained_resnet20(), plugins=plugins).fit(
            train=(x_train, y_train),
            calibration=(x_test[half_a], y_test[half_a]),
            progress=False,
        )
    print(f"fit: {time.perf_counter() - start:.1f} s")
    pixels_b = x_test[half_b]
    sets = ood_sets(args.n, source=_pixels(pixels_b))
    start = time.perf_counter()
    pred_in = wrapped.predict(pixels_b, batch_size=500)
    scores_in = pred_in.scores
    scores_out = {name: wrapped.predict(x, batch_size=500).scores for name, x in sets.items()}
    n_images = 5000 + sum(map(len, sets.values()))
    print(f"predict: {time.perf_counter() - start:.1f} s for {n_images} images")
    rows = [s for s in scores_in if s in CORE_SCORES or s in _ood_names(wrapped)]
    table = []
    for score in rows:
        cells = {}
        for name in sets:
            s_in, s_out = scores_in[score].double().cpu(), scores_out[name][score].double().cpu()
            cells[name] = (auroc(s_in, s_out), fpr_at_tpr(s_in, s_out))
        near = np.mean([cells[k][0] for k in GROUPS["near"]])
        far = np.mean([cells[k][0] for k in GROUPS["far"]])
        table.append((score, cells, near, far))
    table.sort(key=lambda row: -(row[2] + row[3]))
    lines = _markdown(table, list(sets))
    if with_decision:
        lines += ["", "| alpha | flagged in-distribution (half B) |", "| ---: | ---: |"]
        pvalues = {**pred_in.outputs, **pred_in.scores}["ood_pvalue"].double().cpu()
        for alpha in (0.01, 0.05, 0.1):
            lines.append(f"| {alpha} | {100 * float((pvalues <= alpha).double().mean()):.2f}% |")
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


def _pixels(images: torch.Tensor) -> torch.Tensor:
    from _ood_sets import _MEAN, _STD

    return images * _STD + _MEAN


def _ood_names(wrapped: wrapcal.WrappedModel) -> set[str]:
    names: set[str] = set()
    for plugin in wrapped.plugins:
        names |= {k for k, kind in get_tags(plugin).outputs.items() if kind is OutputKind.OOD_SCORE}
    return names


def _markdown(table: list, sets: list[str]) -> list[str]:
    near, far = GROUPS["near"], GROUPS["far"]
    head = ["rank", "score", *near, "near", *far, "far"]
    lines = [
        "AUROC / FPR@95 (%), in-distribution positive; near and far: mean AUROC",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---:", "---", *["---:"] * (len(head) - 2)]) + " |",
    ]
    for rank, (score, cells, near_mean, far_mean) in enumerate(table, 1):
        row = [str(rank), f"`{score}`"]
        row += [f"{cells[k][0]:.3f} / {100 * cells[k][1]:.0f}" for k in near]
        row.append(f"**{near_mean:.3f}**")
        row += [f"{cells[k][0]:.3f} / {100 * cells[k][1]:.0f}" for k in far]
        row.append(f"**{far_mean:.3f}**")
        lines.append("| " + " | ".join(row) + " |")
    best = {k: max(cells[k][0] for score, cells, *_ in table if score != "ood") for k in sets}
    combined = next((cells for score, cells, *_ in table if score == "ood"), None)
    if combined is not None:
        gaps = {k: combined[k][0] - best[k] for k in sets}
        lines += [
            "",
            "`ood` minus the best single score, per set: "
            + ", ".join(f"{k} {gap:+.3f}" for k, gap in gaps.items()),
        ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
