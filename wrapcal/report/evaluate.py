"""``evaluate``: run models over a test set and OOD sets, measure, build a Report.

Each model's predictions on each data set come from :mod:`wrapcal.report.passes`: the
models share the backbone's features, so the backbone runs about once per data set.
A wrapped model gives its calibrated probabilities and every plugin's scores and
outputs; a bare classifier gets the scores it already has (``msp``, ``max_logit``,
``entropy``, ``energy``). Labels stay with their inputs even for a shuffling loader.
The metrics run on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from wrapcal import distributed
from wrapcal.errors import DataError
from wrapcal.features.disk_store import DiskCache
from wrapcal.features.store import CacheOption
from wrapcal.metrics import (
    accuracy,
    adaptive_ece,
    aurc,
    auroc_bootstrap,
    brier,
    classwise_ece,
    ece,
    ece_bootstrap,
    mce,
    nll,
    ood_metrics,
)
from wrapcal.model.chain import named_errors
from wrapcal.model.wrapped import WrappedModel
from wrapcal.plugin.base import get_tags
from wrapcal.plugin.bootstrap import bootstrap_means, percentile_interval
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.types import OutputKind
from wrapcal.plugin.validation import check_labels
from wrapcal.report.outputs import ModelOutputs
from wrapcal.report.passes import model_device, runner_for
from wrapcal.report.report import Report

__all__ = [
    "ModelOutputs",
    "calibration_row",
    "decision_rates",
    "evaluate",
    "ood_row",
    "operating_points_table",
    "plugin_metrics",
]

#: Level of every bootstrap interval in the report.
LEVEL = 0.95


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
    device, dtype = model_device(model)
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
    cache: bool = True,
    cache_dir: str | None = None,
    cache_dtype: str = "float32",
    class_names: Sequence[str] | None = None,
) -> Report:
    """Measure calibration and OOD detection of one or more models, side by side.

    The models share backbone passes: the baseline and every wrapped variant of one
    backbone run it once per data set between them (and reuse the features ``fit``
    computed), through :mod:`wrapcal.features.memory_store`.

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
        cache: Share backbone features between the models and with earlier ``fit``
            calls; ``False`` runs every model over every data set on its own.
        cache_dir: Keep those features in files under this directory (data larger than
            memory; reused across runs), as ``fit(cache_dir=...)`` does.
        cache_dtype: ``"float32"`` or ``"float16"`` for ``cache_dir``.
        class_names: The classes' names in the models' output order, for the report's
            per-class labels (a plugin's ``coverage_by_class`` table, its worst class).
            Default: the names a model carries (a ``class_names`` attribute, a Hugging
            Face config's ``id2label``), else the test set's (a torchvision data set's
            ``classes``, an ``ImageFolder``'s folders), else none (classes by number).

    Returns:
        A :class:`~wrapcal.report.Report`; ``report.save(dir)`` writes HTML, Markdown,
        JSON and the figures.

    Raises:
        DataError: If the test data has no labels or labels outside the model's classes.
        ValueError: If ``models`` or ``ood`` are not what is described above, or
            ``class_names`` does not hold one name per class.
    """
    models, ood = _check_inputs(models, ood)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a number of resamples >= 0; got {bootstrap!r}")
    store: CacheOption = None if cache else False
    if cache and cache_dir is not None:
        store = DiskCache(cache_dir, cache_dtype)
    # Under torchrun every rank must hold the same models, data and settings, or the
    # report gathered from their shards mixes them (a no-op in one process).
    distributed.agree_to_evaluate(
        models,
        {"test": test, **{f"OOD {name!r}": data for name, data in ood.items()}},
        {"n_bins": n_bins, "bootstrap": bootstrap, "seed": seed},
    )
    outputs: dict[str, ModelOutputs] = {}
    labels: dict[str, Tensor] = {}
    for name, model in models.items():
        run = runner_for(model, cache=store)
        test_out = run(test, batch_size=batch_size, progress=progress, desc=f"{name}: test")
        if test_out.labels is None:
            raise DataError(
                "the test data has no labels; pass labelled data, e.g. (X, y) or a "
                "DataLoader yielding (x, y)"
            )
        test_out.labels = labels[name] = check_labels(
            test_out.labels, test_out.probs.shape[0], test_out.probs.shape[1]
        )
        out = ModelOutputs(name, _model_info(model), test_out)
        for ood_name, data in ood.items():
            out.ood[ood_name] = run(
                data, batch_size=batch_size, progress=progress, desc=f"{name}: {ood_name}"
            )
        outputs[name] = out

    names = report_class_names(class_names, models, test, next(iter(outputs.values())))
    settings = {"n_bins": n_bins, "bootstrap": bootstrap, "seed": seed, "level": LEVEL}
    calibration: dict[str, dict[str, Any]] = {}
    ood_results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    # The bootstrap intervals take a while on large sets: a bar of their own.
    tasks = sum(1 + len(out.ood) * len(out.test.scores) for out in outputs.values())
    bar = tqdm(total=tasks, desc="metrics", disable=not progress)
    for name, out in outputs.items():
        calibration[name] = calibration_row(
            out.test.probs, labels[name], n_bins=n_bins, bootstrap=bootstrap, seed=seed
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
        name: plugin_metrics(models[name], out.test.prediction, labels[name])
        for name, out in outputs.items()
    }
    for name, out in outputs.items():
        decision_rates(models[name], out, plugin_results[name], seed)
        points = operating_points_table(models[name], out.test.prediction)
        if points is not None:
            plugin_results[name][OPERATING_POINTS] = {"thresholds": points}
    return Report.build(
        outputs, calibration, ood_results, settings, plugin_results, class_names=names
    )


def _data_class_names(data: Any) -> list[str] | None:
    """The class names a data set says it has: torchvision's ``classes`` (an
    ``ImageFolder``'s folder names in label order), on the set or a loader's set."""
    for holder in (data, getattr(data, "dataset", None)):
        names = getattr(holder, "classes", None)
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return list(names)
    return None


def report_class_names(
    given: Sequence[str] | None, models: Mapping[str, nn.Module], test: Any, first: ModelOutputs
) -> list[str] | None:
    """The class names the report labels classes with: ``given``, else a model's, else
    the test set's; ``None`` when none is known or a found list does not hold one name
    per class (a data set's names that do not match the model are not the model's).

    Raises:
        ValueError: ``given`` does not hold one name per class.
    """
    from wrapcal.export.metadata import class_names_of  # no import cycle: lazy

    classes = int(first.test.probs.shape[1])
    if given is not None:
        names = [str(n) for n in given]
        if len(names) != classes:
            raise ValueError(
                f"class_names holds {len(names)} names but the models have {classes} "
                "classes: give one name per class, in the models' output order"
            )
        return names
    found = [class_names_of(m) for m in models.values()] + [_data_class_names(test)]
    return next((n for n in found if n is not None and len(n) == classes), None)


def decision_rates(
    model: nn.Module, out: ModelOutputs, found: dict[str, dict[str, Any]], seed: int = 0
) -> None:
    """Add to each plugin's metrics, for each of its decisions (``is_ood``, ``abstain``)
    and each OOD set, the share of that set it flags: ``"is_ood on noise"``, with a 95%
    bootstrap interval (the ``ood`` plugin's detection rate; its false-alarm rate on the
    test set is its own ``report_metrics``)."""
    if not isinstance(model, WrappedModel) or not out.ood:
        return
    for name, plugin in zip(model.plugin_names, model.plugins, strict=True):
        decisions = [
            k for k, kind in get_tags(plugin).outputs.items() if kind is OutputKind.DECISION
        ]
        for output in decisions:
            for ood_name, o in out.ood.items():
                flagged = o.prediction.outputs.get(output)
                if flagged is None or not len(flagged):
                    continue
                share = flagged.double()[:, None]
                means = bootstrap_means(share, 1000, seed)
                found.setdefault(name, {})[f"{output} on {ood_name}"] = {
                    "value": float(share.mean()),
                    "ci": percentile_interval(means[:, 0]),
                    "percent": True,
                }


#: The key of the model's operating points among the plugin metrics.
OPERATING_POINTS = "operating_points"


def operating_points_table(model: nn.Module, prediction: Prediction) -> dict[str, list] | None:
    """The thresholds ``fit`` measured on the calibration set at each acceptance rate,
    and the share of the test set each accepts (``score <= threshold``): how the chosen
    rates hold on new in-distribution data. ``None`` without operating points."""
    points = getattr(model, "operating_points", None) if isinstance(model, WrappedModel) else None
    if not points:
        return None
    tables = points.get("thresholds_at") or {
        repr(float(points["accept_rate"])): points["thresholds"]
    }
    table: dict[str, list] = {"score": [], "accept_rate": [], "threshold": [], "test_accepted": []}
    for rate, thresholds in tables.items():
        for score, threshold in thresholds.items():
            values = prediction.scores.get(score)
            if values is None:
                continue
            table["score"].append(score)
            table["accept_rate"].append(float(rate))
            table["threshold"].append(float(threshold))
            table["test_accepted"].append(float((values.double() <= threshold).double().mean()))
    return table if table["score"] else None


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
