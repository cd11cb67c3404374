"""``evaluate``: run models once over a test set and OOD sets, measure, build a Report.

Every model makes one pass over every data set (the test set and each OOD set). A
``WrappedModel`` is asked for its predictions batch by batch with ``predict``, which
returns its calibrated probabilities and every score its plugins provide; a bare
``nn.Module`` runs in eval mode under ``no_grad`` and gets the scores a bare classifier
already has (:func:`wrapcal.metrics.baseline_scores`). The batches are read once, so the
labels stay aligned with the predictions even for a shuffling ``DataLoader``. Outputs
are moved to the CPU batch by batch; the metrics run there.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wrapcal.chain import CORE_OUTPUTS, named_errors
from wrapcal.data import check_labels, iter_batches, num_samples
from wrapcal.errors import DataError
from wrapcal.metrics import (
    accuracy,
    adaptive_ece,
    aurc,
    auroc_bootstrap,
    baseline_scores,
    brier,
    classwise_ece,
    ece,
    ece_bootstrap,
    mce,
    nll,
    ood_metrics,
)
from wrapcal.prediction import Prediction
from wrapcal.probs import entropy, logits_to_probs, looks_like_probabilities
from wrapcal.report.outputs import ModelOutputs, SetOutputs
from wrapcal.report.report import Report
from wrapcal.torch_utils import preserved_modes
from wrapcal.wrapped import WrappedModel

__all__ = [
    "ModelOutputs",
    "calibration_row",
    "evaluate",
    "ood_row",
    "plugin_metrics",
    "run_model",
]

#: Level of every bootstrap interval in the report.
LEVEL = 0.95


def _model_device(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device, None
    return torch.device("cpu"), None


def _bare_prediction(outputs: Tensor, name: str, warned: set[str]) -> Prediction:
    if outputs.dtype in (torch.float16, torch.bfloat16) or not outputs.is_floating_point():
        outputs = outputs.float()
    if looks_like_probabilities(outputs):
        # A model that ends in softmax: its outputs are the probabilities themselves.
        if name not in warned:
            warned.add(name)
            warnings.warn(
                f"model {name!r} returns probabilities (every row sums to 1), not logits: "
                "it is evaluated on them as probabilities; energy and max_logit need "
                "logits (wrap the model, or drop its final softmax, to get them)",
                UserWarning,
                stacklevel=4,
            )
        probs = outputs / outputs.sum(dim=-1, keepdim=True)
        logits = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
        scores = {"msp": 1 - probs.amax(dim=-1), "entropy": entropy(probs)}
    elif outputs.shape[-1] > 1:
        logits, probs = outputs, logits_to_probs(outputs)
        scores = baseline_scores(logits)
    else:
        # A single-logit binary model: the logit-based baselines would be constant.
        logits, probs = outputs, logits_to_probs(outputs)
        scores = {"msp": 1 - probs.max(dim=-1).values, "entropy": entropy(probs)}
    return Prediction.build(logits, probs, scores, {k: CORE_OUTPUTS[k] for k in scores})


def _as_logits(out: Any, model: nn.Module) -> Tensor:
    # Hugging Face style models return an object with .logits.
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(out).__name__
        raise DataError(
            f"{type(model).__name__} returned {shape}, expected logits [batch, classes]; "
            "evaluate classifiers that map inputs to logits"
        )
    return logits


def run_model(
    model: nn.Module, data: Any, *, batch_size: int = 256, progress: bool = True, desc: str = ""
) -> SetOutputs:
    """One pass of ``model`` over ``data``: probabilities, scores and labels on the CPU.

    Args:
        model: A :class:`~wrapcal.WrappedModel` or a bare classifier (inputs -> logits).
        data: Anything :func:`wrapcal.data.iter_batches` reads.
        batch_size: Batch size for data that is not already batched.
        progress: Show a progress bar.
        desc: The progress bar's label.

    Returns:
        The :class:`SetOutputs`. The model's train/eval flags and weights are unchanged.
    """
    wrapped = isinstance(model, WrappedModel)
    device, dtype = _model_device(model)
    parts, labels = [], []
    warned: set[str] = set()
    bar = tqdm(total=num_samples(data), desc=desc, unit="img", disable=not progress)
    start = time.perf_counter()
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            for x, y in iter_batches(data, batch_size):
                if wrapped:
                    # One predict call per batch: the labels stay with their inputs.
                    pred = model.predict(x, batch_size=max(1, x.shape[0]))
                else:
                    x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
                    pred = _bare_prediction(_as_logits(model(x), model), desc, warned)
                parts.append(pred.to("cpu"))
                labels.append(y)
                bar.update(x.shape[0])
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if not parts:
        raise DataError(f"the data set {desc!r} is empty")
    labelled = all(y is not None for y in labels)
    return SetOutputs(
        prediction=Prediction.cat(parts),
        labels=torch.cat([y.cpu() for y in labels]) if labelled else None,
        seconds=seconds,
    )


def _ci(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [float(interval[0]), float(interval[1])]


def calibration_row(
    probs: Tensor, labels: Tensor, *, n_bins: int = 15, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The calibration metrics of one model, with the ECE's bootstrap interval.

    Returns:
        ``accuracy``, ``nll``, ``brier``, ``ece``, ``ece_ci`` (``[low, high]``, ``None``
        when ``bootstrap == 0``), ``adaptive_ece``, ``mce``, ``classwise_ece``, ``aurc``.
    """
    interval = (
        ece_bootstrap(probs, labels, n_bins=n_bins, n_resamples=bootstrap, seed=seed, level=LEVEL)
        if bootstrap
        else None
    )
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, n_bins=n_bins),
        "ece_ci": _ci(interval),
        "adaptive_ece": adaptive_ece(probs, labels, n_bins=n_bins),
        "mce": mce(probs, labels, n_bins=n_bins),
        "classwise_ece": classwise_ece(probs, labels, n_bins=n_bins),
        "aurc": aurc(probs, labels),
    }


def ood_row(
    scores_in: Tensor, scores_out: Tensor, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """OOD metrics of one score on one OOD set, with the AUROC's bootstrap interval.

    Returns:
        ``auroc``, ``auroc_ci`` (``None`` when ``bootstrap == 0``), ``aupr_in``,
        ``aupr_out``, ``fpr95``; or ``{"error": message}`` when the score cannot be
        measured (NaN or inf values), so one broken score does not sink the report.
    """
    try:
        row: dict[str, Any] = ood_metrics(scores_in, scores_out)
        interval = (
            auroc_bootstrap(scores_in, scores_out, n_resamples=bootstrap, seed=seed, level=LEVEL)
            if bootstrap
            else None
        )
    except ValueError as err:
        return {"error": str(err)}
    return {
        "auroc": row["auroc"],
        "auroc_ci": _ci(interval),
        "aupr_in": row["aupr_in"],
        "aupr_out": row["aupr_out"],
        "fpr95": row["fpr95"],
    }


def _model_info(model: nn.Module) -> dict[str, Any]:
    device, dtype = _model_device(model)
    info: dict[str, Any] = {
        "class": type(model).__name__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if isinstance(model, WrappedModel):
        # The user's model: a library name, else the class the split kept inside.
        inner = getattr(model.backbone, "model", model.backbone)
        info["wrapped"] = model.source.get("name") or type(inner).__name__
        info["plugins"] = list(model.plugin_names)
    return info


def _check_inputs(models: Any, ood: Any) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not isinstance(models, Mapping) or not models:
        raise ValueError(
            "models must be an nn.Module or a non-empty dict name -> model, e.g. "
            "{'baseline': model, 'wrapped': wrapped}"
        )
    for name, model in models.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"model names must be non-empty strings; got {name!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"models[{name!r}] is a {type(model).__name__}, not an nn.Module; pass the "
                "classifier (or the WrappedModel) itself"
            )
    ood = {} if ood is None else ood
    if not isinstance(ood, Mapping):
        raise ValueError("ood must be a dict name -> data, e.g. {'noise': noise_images}")
    for name in ood:
        if not isinstance(name, str) or not name:
            raise ValueError(f"OOD set names must be non-empty strings; got {name!r}")
    return dict(models), dict(ood)


def evaluate(
    models: nn.Module | Mapping[str, nn.Module],
    test: Any,
    ood: Mapping[str, Any] | None = None,
    *,
    n_bins: int = 15,
    batch_size: int = 256,
    progress: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Report:
    """Measure calibration and OOD detection of one or more models, side by side.

    Args:
        models: One classifier, or a dict name -> model. A model is a
            :class:`~wrapcal.WrappedModel` (its ``predict`` gives the calibrated
            probabilities and all its scores) or a bare ``nn.Module`` mapping inputs to
            logits (softmax probabilities; scores ``msp``, ``max_logit``, ``entropy``,
            ``energy``). Models may live on any device; they are not modified.
        test: Labelled in-distribution test data (anything ``wrapcal.data`` reads).
        ood: A dict name -> out-of-distribution data; their labels are ignored.
        n_bins: Bins of the ECE variants and reliability diagrams.
        batch_size: Batch size for data that is not already batched.
        progress: Show progress bars.
        bootstrap: Number of bootstrap resamples for the 95% intervals of ECE (basic)
            and AUROC (percentile); 0 skips the intervals.
        seed: Seed of the bootstrap resamples.

    Returns:
        A :class:`~wrapcal.report.Report`; ``report.save(dir)`` writes HTML, Markdown,
        JSON and the figures.

    Raises:
        DataError: If the test data has no labels or labels outside the model's classes.
        ValueError: If ``models`` or ``ood`` are not what is described above.
    """
    models, ood = _check_inputs(models, ood)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a number of resamples >= 0; got {bootstrap!r}")
    outputs: dict[str, ModelOutputs] = {}
    for name, model in models.items():
        test_out = run_model(
            model, test, batch_size=batch_size, progress=progress, desc=f"{name}: test"
        )
        if test_out.labels is None:
            raise DataError(
                "the test data has no labels; pass labelled data, e.g. (X, y) or a "
                "DataLoader yielding (x, y)"
            )
        test_out.labels = check_labels(
            test_out.labels, test_out.probs.shape[0], test_out.probs.shape[1]
        )
        out = ModelOutputs(name, _model_info(model), test_out)
        for ood_name, data in ood.items():
            out.ood[ood_name] = run_model(
                model, data, batch_size=batch_size, progress=progress, desc=f"{name}: {ood_name}"
            )
        outputs[name] = out

    settings = {"n_bins": n_bins, "bootstrap": bootstrap, "seed": seed, "level": LEVEL}
    calibration, ood_results = {}, {}
    # The bootstrap intervals take a while on large sets: a bar of their own.
    tasks = sum(1 + len(out.ood) * len(out.test.scores) for out in outputs.values())
    bar = tqdm(total=tasks, desc="metrics", disable=not progress)
    for name, out in outputs.items():
        calibration[name] = calibration_row(
            out.test.probs, out.test.labels, n_bins=n_bins, bootstrap=bootstrap, seed=seed
        )
        bar.update(1)
        ood_results[name] = {}
        for ood_name, o in out.ood.items():
            rows = {}
            for score in out.test.scores:
                if score in o.scores:
                    rows[score] = ood_row(
                        out.test.scores[score], o.scores[score], bootstrap=bootstrap, seed=seed
                    )
                bar.update(1)
            ood_results[name][ood_name] = rows
    bar.close()
    plugin_results = {
        name: plugin_metrics(models[name], out.test.prediction, out.test.labels)
        for name, out in outputs.items()
    }
    return Report.build(outputs, calibration, ood_results, settings, plugin_results)


def _metric(value: Any) -> Any:
    """A plugin's metric in the report's form: ``{"value", "ci"?, ...}`` or as given."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value": float(value)}
    return value


def plugin_metrics(
    model: nn.Module, prediction: Prediction, labels: Tensor
) -> dict[str, dict[str, Any]]:
    """Each plugin's :meth:`~wrapcal.Plugin.report_metrics` on the test set's prediction
    (an empty dict for a bare model or plugins that report nothing)."""
    if not isinstance(model, WrappedModel):
        return {}
    found = {}
    for name, plugin in zip(model.plugin_names, model.plugins, strict=True):
        metrics = named_errors(name, plugin.report_metrics, prediction, labels)
        if not isinstance(metrics, dict):
            raise TypeError(f"plugin {name}: report_metrics() must return a dict")
        if metrics:
            found[name] = {str(k): _metric(v) for k, v in metrics.items()}
    return found
