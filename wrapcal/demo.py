"""``wrapcal demo``: train a small timm model on the bundled digits, wrap it, measure it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import wrapcal
from wrapcal.data import digits


def train_small_model(
    data: wrapcal.data.DigitsData, seconds: float = 8.0, seed: int = 0, progress: bool = True
) -> torch.nn.Module:
    """Train timm's ``resnet10t`` from scratch on the digits for a few seconds."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=10, drop_rate=0.1)
    x, y = data.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, epochs = time.perf_counter(), 0
    bar = tqdm(desc="train resnet10t on digits", unit="epoch", disable=not progress)
    while time.perf_counter() - start < seconds or epochs < 2:
        for idx in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        epochs += 1
        bar.update(1)
    bar.close()
    return model.eval()


def _ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.mean() * abs((pred[mask] == labels[mask]).mean() - conf[mask].mean())
    return total


def run_demo(out: str | Path = "wrapcal-demo-report", progress: bool = True, seed: int = 0) -> None:
    """Train, wrap, fit and evaluate on the embedded default data set."""
    data = digits(seed=seed)
    model = train_small_model(data, seed=seed, progress=progress)
    plugins = [name for name in ("temperature",) if name in wrapcal.plugin_registry()]
    wrapped = wrapcal.wrap(model, plugins=plugins).eval()
    wrapped.fit(train=data.train, calibration=data.calibration, progress=progress)
    x, y = data.test
    for name, m in (("baseline", model), ("wrapped", wrapped)):
        with torch.no_grad():
            probs = F.softmax(m(x), dim=-1).numpy()
        acc = float((probs.argmax(1) == y.numpy()).mean())
        print(f"{name:10s} accuracy {acc:.3f}  ECE {_ece(probs, y.numpy()):.4f}")
