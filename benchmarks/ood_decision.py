"""The ``ood`` decision on the shared ResNet-20: the combined score against every single
score, per OOD kind, and the false-alarm rate of ``is_ood`` over random calibration draws.

Protocol (fitted on in-distribution data only):

* In-distribution: the detectors fit on the 10000 CIFAR-10 training features; the
  ``ood`` plugin's reference distributions are the same training features' scores and
  its conformal p-value is calibrated on ``N_CAL`` images of the (JPEG) CIFAR-10 test
  set; AUROCs are measured on the other test images against each OOD kind.
* OOD kinds (``N_OOD`` images each, one backbone pass, cached under the test cache):
  far: MNIST, Gaussian noise, uniform noise, shuffled pixels, scikit-learn's digits;
  near / shifted: 8x8 crops of CIFAR-10 training images upscaled, crops of the two photos
  scikit-learn bundles (natural images of no CIFAR class), a heavy Gaussian blur, JPEG at
  quality 5, synthetic textures (sums of random oriented sinusoids), colour-inverted
  images, images rotated by 90 degrees, mixup of two test images; and the held-out
  classes: detectors and ``ood`` fitted on 8 classes (train, calibration and test
  without ``ship`` and ``truck``), those two classes as the OOD set.
* The combinations compared (each on the same per-score p-values against the training
  scores, then a conformal p-value on the calibration set): ``fisher`` (over every
  score), ``fisher_subset`` (knn, vim, mahalanobis, energy), ``min_p`` (Bonferroni's
  statistic: the smallest p-value), ``stouffer_whitened`` and the default chosen
  (``wrapcal_plugins.decide.ood_decision``'s ``COMBINATIONS``).
* False alarms: ``N_SPLITS`` random splits of the 10000 test images into ``N_CAL``
  calibration and the rest; the share of the rest flagged at each alpha.

Run: ``python benchmarks/ood_decision.py`` (needs ``../shared/data``; about two minutes on
2 cores the first time, the OOD images' features are then cached).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from shared_data import (
    CIFAR_NPZ,
    RESNET20_WEIGHTS,
    SHARED_DATA,
    cache_dir,
    cifar10,
    resnet20_features,
    resnet20_on_features,
    resnet20_outputs,
)
from sklearn.metrics import roc_auc_score

import wrapcal
from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD
from wrapcal_plugins.decide import ood_decision

N_OOD = 2000
N_CAL = 3000
N_SPLITS = 50
ALPHAS = (0.01, 0.05, 0.1)
_VERSION = "2"
#: The detectors fitted beside ``ood`` (every built-in that scores from cached features;
#: ODIN and GradNorm need the images' gradients, the identity backbone has none).
DETECTORS = ("knn", "vim", "mahalanobis", "react")
OPTIONAL_DETECTORS = (
    "gen", "kl_matching", "she", "dice", "nnguide", "fdbd", "residual", "ash", "scale",
)  # fmt: skip
HELD_OUT = (8, 9)  # ship, truck


# --- the OOD images ---------------------------------------------------------------------


def _normalise(rgb01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (rgb01.clamp(0, 1) - mean) / std


def _raw(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return images * std + mean


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def _jpeg(x01: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    from PIL import Image

    out = []
    for image in (x01.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _textures(n: int, g: torch.Generator) -> torch.Tensor:
    """Sums of 3 random oriented sinusoids per channel: periodic, non-object images."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    out = torch.zeros(n, 3, 32, 32)
    for _ in range(3):
        freq = 0.1 + 0.9 * torch.rand(n, 1, 1, 1, generator=g)
        angle = torch.pi * torch.rand(n, 1, 1, 1, generator=g)
        phase = 2 * torch.pi * torch.rand(n, 3, 1, 1, generator=g)
        wave = torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
        out += wave * torch.rand(n, 3, 1, 1, generator=g)
    return 0.5 + 0.25 * out


def _crops(source: torch.Tensor, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random ``size`` x ``size`` crops of images ``[M, 3, H, W]``, resized to 32."""
    pick = torch.randint(len(source), (n,), generator=g)
    h, w = source.shape[-2:]
    ys = torch.randint(h - size + 1, (n,), generator=g)
    xs = torch.randint(w - size + 1, (n,), generator=g)
    crops = torch.stack(
        [source[i, :, y : y + size, x : x + size] for i, y, x in zip(pick, ys, xs, strict=True)]
    )
    return F.interpolate(crops, size=(32, 32), mode="bilinear", antialias=True)


def ood_images(test_pool: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every OOD kind but MNIST and the held-out classes, as normalised ``[N_OOD, 3, 32, 32]``.

    ``test_pool``: normalised CIFAR-10 test images they are derived from.
    """
    from sklearn.datasets import load_digits, load_sample_images

    g = torch.Generator().manual_seed(0)
    base = _raw(test_pool[:N_OOD])
    others = _raw(test_pool[N_OOD : 2 * N_OOD])
    train = _raw(cifar10("train")[0])
    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2) / 255
    digits = torch.from_numpy(load_digits().images).float()[:N_OOD] / 16
    digits = F.interpolate(digits[:, None], size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1)
    order = torch.randperm(32 * 32, generator=g)
    lam = 0.5
    return {
        k: _normalise(v)
        for k, v in {
            "gaussian_noise": 0.5 + 0.25 * torch.randn(base.shape, generator=g),
            "uniform_noise": torch.rand(base.shape, generator=g),
            "shuffled_pixels": base.flatten(2)[:, :, order].reshape(base.shape),
            "digits": digits,
            "cifar_crops": _crops(train, N_OOD, 8, g),
            "photo_crops": _crops(photos.float(), N_OOD, 48, g),
            "blur": _blur(base, 2.0),
            "jpeg_q5": _jpeg(base, 5),
            "textures": _textures(N_OOD, g),
            "inverted": 1 - base,
            "rot90": base.rot90(1, dims=(2, 3)),
            "mixup": lam * base + (1 - lam) * others,
        }.items()
    }


def ood_features() -> dict[str, torch.Tensor]:
    """The OOD kinds' features (MNIST from ``resnet20_outputs``), cached on disk."""
    digest = hashlib.sha256(f"ood-decision v{_VERSION} n{N_OOD}".encode())
    digest.update(RESNET20_WEIGHTS.read_bytes())
    digest.update(f"{CIFAR_NPZ.stat().st_size}:{CIFAR_NPZ.stat().st_mtime_ns}".encode())
    digest.update(
        Path(__file__).read_bytes().split(b"# --- the OOD images")[1].split(b"def ood_features")[0]
    )
    path = cache_dir() / f"ood_decision-{digest.hexdigest()[:16]}.npz"
    if not path.is_file():
        images = cifar10("test")[0][_pool_index()]
        arrays = {name: resnet20_features(x) for name, x in ood_images(images).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    with np.load(path, allow_pickle=False) as f:
        out = {k: torch.from_numpy(f[k]) for k in f.files}
    out["mnist"] = resnet20_outputs()["mnist_features"][:N_OOD]
    return out


def _pool_index() -> torch.Tensor:
    """Test images the derived OOD kinds come from (never in calibration or evaluation)."""
    return torch.from_numpy(np.random.default_rng(0).permutation(10000)[: 2 * N_OOD])


# --- the measurement -------------------------------------------------------------------------


def detectors() -> list[str]:
    """Every registered detector that scores cached features (ODIN perturbs the images)."""
    found = []
    for name, info in sorted(wrapcal.plugin_registry().items()):
        try:
            plugin = info.factory()
        except Exception:  # a plugin being written: left out
            continue
        # ODIN perturbs images; an ensemble of one network scores 0 everywhere.
        if wrapcal.get_tags(plugin).stage is wrapcal.Stage.DETECT and name not in (
            "odin",
            "ensemble",
        ):
            found.append(name)
    return found


def fit(names: list[str], train: tuple, calibration: tuple) -> wrapcal.WrappedModel:
    """A model of the detectors that fit (those that fail are left out and named) and ood."""
    kept = []
    for name in names:
        try:
            resnet20_on_features([name]).fit_features(
                train=train, calibration=calibration, progress=False
            )
            kept.append(name)
        except Exception as err:  # report and go on
            print(f"  (left out {name}: {type(err).__name__}: {str(err)[:80]})")
    return resnet20_on_features([*kept, "ood"]).fit_features(
        train=train, calibration=calibration, progress=False
    )


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    truth = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    return float(
        roc_auc_score(truth, np.r_[scores_in.double().numpy(), scores_out.double().numpy()])
    )


def combined(wrapped: wrapcal.WrappedModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every combination's statistic of ``x`` (the plugin's references), and the plugin's."""
    plugin = wrapped.get_plugin("ood")
    pred = wrapped.predict_features(x)
    table = torch.stack([pred.scores[n].double() for n in plugin.scores_], dim=1)
    pvalues = ood_decision.reference_pvalues(plugin.reference, table)
    out = {
        c: ood_decision.combine(pvalues, c, plugin.n_reference_) for c in ood_decision.COMBINATIONS
    }
    assert torch.allclose(out[plugin.combination].float(), pred.scores["ood"].float(), rtol=1e-5)
    return {**{k: v for k, v in pred.scores.items() if pred.kinds[k].name == "OOD_SCORE"}, **out}


def table(title: str, id_scores: dict, ood_sets: dict[str, dict]) -> dict[str, list[float]]:
    singles = [k for k in id_scores if k not in ood_decision.COMBINATIONS and k != "ood"]
    print(f"\n{title}: AUROC (ID positive = in-distribution held out, higher = better)")
    print(
        "| OOD kind | "
        + " | ".join(singles)
        + " | best single | ood (cauchy) | gap | "
        + " | ".join(f"{c} gap" for c in ood_decision.COMBINATIONS if c != "cauchy")
        + " |"
    )
    print("| --- " * (len(singles) + 4 + len(ood_decision.COMBINATIONS) - 1) + "|")
    gaps: dict[str, list[float]] = {c: [] for c in ood_decision.COMBINATIONS}
    for kind, scores in ood_sets.items():
        values = {k: auroc(id_scores[k], scores[k]) for k in id_scores}
        best = max(singles, key=values.get)
        gap = values["ood"] - values[best]
        for c in ood_decision.COMBINATIONS:
            gaps[c].append(values[c] - values[best])
        others = [
            f"{values[c] - values[best]:+.3f}" for c in ood_decision.COMBINATIONS if c != "cauchy"
        ]
        print(
            f"| {kind} | "
            + " | ".join(f"{values[k]:.3f}" for k in singles)
            + f" | {best} {values[best]:.3f} | {values['ood']:.3f} | {gap:+.3f} | "
            + " | ".join(others)
            + " |"
        )
    return gaps


def false_alarms(statistic: np.ndarray, splits: int, n_cal: int) -> None:
    """Share of held-out ID flagged at each alpha, over random calibration splits."""
    g = np.random.default_rng(0)
    rates = {alpha: [] for alpha in ALPHAS}
    for _ in range(splits):
        order = g.permutation(len(statistic))
        cal, rest = np.sort(statistic[order[:n_cal]]), statistic[order[n_cal:]]
        pvalue = (1 + n_cal - np.searchsorted(cal, rest, side="left")) / (n_cal + 1)
        for alpha in ALPHAS:
            rates[alpha].append((pvalue <= alpha).mean())
    print(f"\nfalse alarms of is_ood on held-out ID images, {splits} random splits, n_cal {n_cal}")
    print("| alpha | mean flagged | std over splits | min | max |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for alpha, found in rates.items():
        f = np.array(found)
        print(
            f"| {alpha:g} | {100 * f.mean():.2f}% | {100 * f.std():.2f}% | "
            f"{100 * f.min():.2f}% | {100 * f.max():.2f}% |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", type=int, default=N_SPLITS)
    args = parser.parse_args()
    if not (SHARED_DATA / "cifar10_jpeg.npz").is_file():
        print(f"needs the shared data in {SHARED_DATA}; nothing to measure")
        return 0
    out = resnet20_outputs()
    pool = set(_pool_index().tolist())
    rest = torch.tensor([i for i in range(10000) if i not in pool])
    rest = rest[torch.from_numpy(np.random.default_rng(1).permutation(len(rest)))]
    test_x, test_y = out["test_features"][rest], out["test_labels"][rest]
    names = detectors()
    print(f"detectors: {', '.join(names)} (+ the core's energy and max_logit)")

    # All ten classes in-distribution; the OOD kinds.
    cal = slice(0, N_CAL)
    held = slice(N_CAL, None)
    wrapped = fit(names, (out["train_features"], out["train_labels"]), (test_x[cal], test_y[cal]))
    plugin = wrapped.get_plugin("ood")
    print(
        f"ood: scores {plugin.scores_}, {plugin.n_reference_} reference rows, "
        f"{plugin.n_calibration_} calibration"
    )
    id_scores = combined(wrapped, test_x[held])
    kinds = {k: combined(wrapped, v) for k, v in ood_features().items()}
    gaps = table("CIFAR-10 (10 classes) against each OOD kind", id_scores, kinds)

    # Eight classes in-distribution, ship and truck out.
    keep_train = out["train_labels"] < 8
    keep_test = test_y < 8
    x8, y8 = test_x[keep_test], test_y[keep_test]
    n8 = int(0.5 * len(x8))
    eight = fit(
        names,
        (out["train_features"][keep_train], out["train_labels"][keep_train]),
        (x8[:n8], y8[:n8]),
    )
    held8 = combined(eight, x8[n8:])
    more = table(
        "CIFAR-10, 8 classes in-distribution (the model was trained on all 10)",
        held8,
        {"held_out_classes": combined(eight, test_x[~keep_test])},
    )
    print("\neach combination against the best single score, over the kinds above")
    print("| combination | worst gap | median gap | kinds within 0.01 | worst, 10 classes |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for c in ood_decision.COMBINATIONS:
        every = gaps[c] + more[c]
        print(
            f"| {c} | {min(every):+.3f} | {np.median(every):+.3f} | "
            f"{sum(g >= -0.01 for g in every)} of {len(every)} | {min(gaps[c]):+.3f} |"
        )

    statistic = wrapped.predict_features(test_x).scores["ood"].double().numpy()
    false_alarms(statistic, args.splits, N_CAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
