"""``wrapcal demo``: the whole pipeline on data bundled with scikit-learn, no download.

1. Train timm's ``resnet10t`` from scratch on the digits for a few seconds.
2. Wrap it with all four built-in plugins (and with each one alone), fit them from one
   backbone pass per data set. "Production traffic" for the discrepancy heads is a mix
   of unseen digits and patches of one of scikit-learn's sample photographs.
3. Evaluate against OOD sets the traffic did not contain: patches of the *other*
   sample photograph, and Gaussian noise; write the report (HTML, JSON, Markdown, PNG).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import wrapcal
from wrapcal.datasets import DigitsData, digits, digits_to_images

BUILT_IN_PLUGINS = ("label_smoothing", "discrepancy", "mc_dropout", "temperature")
#: Per-plugin settings of the demo: alpha="auto" keeps label smoothing from
#: over-smoothing a 10-class model into underconfidence.
DEMO_PARAMS = {"label_smoothing": {"alpha": "auto"}}


def train_small_model(
    data: DigitsData, epochs: int = 8, seed: int = 0, progress: bool = True
) -> torch.nn.Module:
    """Train timm's ``resnet10t`` from scratch on the digits (a few seconds on a CPU).

    A fixed number of epochs, not of seconds, so every machine gets the same model.
    """
    import timm

    torch.manual_seed(seed)  # timm's initialisation draws from the global generator
    model = timm.create_model("resnet10t", num_classes=10, drop_rate=0.1)
    x, y = data.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(
        range(epochs), desc="train resnet10t on digits", unit="epoch", disable=not progress
    ):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def photo_patches(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """Random patches of a scikit-learn sample photo, made to look like digits inputs.

    Grey, 8x8 at the digits' 0..16 scale, then the same upsampling and normalisation:
    natural-image OOD that differs from digits in content, not in preprocessing.
    """
    from sklearn.datasets import load_sample_image

    image = load_sample_image(f"{name}.jpg").astype(np.float32).mean(axis=2) / 255.0
    rng = np.random.default_rng(seed)
    size = 48
    rows = rng.integers(0, image.shape[0] - size, n)
    cols = rng.integers(0, image.shape[1] - size, n)
    patches = np.stack([image[r : r + size, c : c + size] for r, c in zip(rows, cols, strict=True)])
    small = F.adaptive_avg_pool2d(torch.from_numpy(patches)[:, None], 8)[:, 0]
    return digits_to_images(small.numpy() * 16.0)


def gaussian_noise(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Noise with the per-pixel mean and standard deviation of a data set."""
    g = torch.Generator().manual_seed(seed)
    return like.mean(0) + like.std(0) * torch.randn(like.shape, generator=g)


def run_demo(
    out: str | Path = "wrapcal-demo-report", progress: bool = True, seed: int = 0
) -> wrapcal.report.Report:
    """Train, wrap, fit and evaluate on the embedded default data; write the report."""
    from wrapcal.report import evaluate

    start = time.perf_counter()
    data = digits(seed=seed)
    model = train_small_model(data, seed=seed, progress=progress)
    x_test, _ = data.test
    # Production traffic: unseen digits mixed with patches of one photo.
    x_cal, _ = data.calibration
    traffic = torch.cat([x_cal, photo_patches("china", len(x_cal), seed)])
    ood = {
        "photo patches (flower)": photo_patches("flower", len(x_test), seed + 1),
        "gaussian noise": gaussian_noise(x_test, seed),
    }
    missing = [p for p in BUILT_IN_PLUGINS if p not in wrapcal.plugin_registry()]
    if missing:
        raise wrapcal.PluginNotFoundError(f"the demo needs the built-in plugins; missing {missing}")
    models: dict[str, torch.nn.Module] = {"baseline": model}
    specs = [(name, DEMO_PARAMS.get(name, {})) for name in BUILT_IN_PLUGINS]
    setups = {spec[0]: [spec] for spec in specs}
    setups["all four"] = specs
    fit_seconds = {}
    for name, plugins in setups.items():
        t0 = time.perf_counter()
        wrapped = wrapcal.wrap(model, plugins=plugins)
        wrapped.fit(
            train=data.train,
            calibration=data.calibration,
            unlabeled=traffic,
            progress=progress,
            seed=seed,
        )
        fit_seconds[name] = time.perf_counter() - t0
        models[name] = wrapped.eval()
    report = evaluate(models, test=data.test, ood=ood, progress=progress, seed=seed)
    path = report.save(out)
    print_summary(report, fit_seconds)
    print(f"\nreport: {Path(path).resolve() / 'report.html'} (also report.md, report.json, PNGs)")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return report


def _primary_score(scores: list[str]) -> str:
    """The score a plugin adds for OOD detection, else the maximum softmax probability."""
    for name in ("discrepancy", "mutual_information", "msp"):
        if name in scores:
            return name
    return scores[0]


def print_summary(report: wrapcal.report.Report, fit_seconds: dict[str, float]) -> None:
    """A short table: calibration on the test digits, OOD detection on each OOD set."""
    data = report.to_dict()
    ood_sets = list(data["data"]["ood"])
    header = f"{'model':16s} {'acc':>6s} {'ECE':>6s} {'NLL':>6s} {'fit s':>6s}  {'OOD score':18s}"
    header += "".join(f" {'AUROC':>6s} {'FPR95':>6s} |" for _ in ood_sets)
    print("\nOOD sets: " + ", ".join(f"({i + 1}) {s}" for i, s in enumerate(ood_sets)))
    print(" " * 64 + "".join(f" {f'({i + 1})':^13s} |" for i in range(len(ood_sets))))
    print(header)
    for model, cal in data["calibration"].items():
        score = _primary_score(data["models"][model]["scores"])
        row = f"{model:16s} {cal['accuracy']:6.3f} {cal['ece']:6.3f} {cal['nll']:6.3f}"
        row += f" {fit_seconds.get(model, 0.0):6.1f}  {score:18s}"
        for s in ood_sets:
            m = data["ood"][model][s][score]
            row += f" {m['auroc']:6.3f} {m['fpr95']:6.3f} |"
        print(row)
