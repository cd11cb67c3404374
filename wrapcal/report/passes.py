"""One pass of each model over each data set, sharing the backbone's features.

A wrapped model whose plugins work from cached features gets its features from the
shared feature cache (:mod:`wrapcal.features.memory_store`): the baseline and every wrapped
variant of one backbone make one backbone pass per data set between them. A bare
classifier is split the same way (``wrapcal.wrap(model)`` gives exactly its outputs)
to share that pass; one that cannot be split (its last layer's output is changed
before it is returned, e.g. by a softmax) runs on its own, batch by batch, as does a
wrapped model whose plugins need the inputs (MC dropout over the whole network).
Outputs are moved to the CPU; the metrics run there.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wrapcal import distributed
from wrapcal.data import iter_batches, num_samples
from wrapcal.errors import DataError, SplitError
from wrapcal.features.store import CacheOption
from wrapcal.model.assemble import wrap
from wrapcal.model.chain import CORE_OUTPUTS, Chain
from wrapcal.model.wrapped import WrappedModel
from wrapcal.plugin.base import get_tags
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.probs import check_logits, entropy, logits_to_probs, looks_like_probabilities
from wrapcal.plugin.torch_helpers import preserved_modes
from wrapcal.report.outputs import SetOutputs

__all__ = ["Runner", "model_device", "run_model", "runner_for"]

#: How ``evaluate`` runs a model over a data set:
#: ``runner(data, batch_size=..., progress=..., desc=...) -> SetOutputs``.
Runner = Callable[..., SetOutputs]


def model_device(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
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
    else:
        # The scores a wrapped model without plugins gives, by the same formulas, so a
        # baseline measures the same whichever way it ran.
        check_logits(outputs)
        logits, probs = outputs, logits_to_probs(outputs)
        scores, _ = Chain.core_outputs(logits.unsqueeze(0), probs)
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
    wrapped = model if isinstance(model, WrappedModel) else None
    device, dtype = model_device(model)
    parts, labels = [], []
    warned: set[str] = set()
    bar = tqdm(total=num_samples(data), desc=desc, unit="img", disable=not progress)
    start = time.perf_counter()
    batches: Any = iter_batches(data, batch_size)
    if wrapped is not None and wrapped.chain().collective and distributed.active():
        # Its inference synchronises the ranks: every rank runs as many batches.
        batches = distributed.lockstep(batches)
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            x = None
            for batch in batches:
                if batch is None:  # a padding round, shaped like this rank's last input
                    assert wrapped is not None  # only a collective wrapped model pads
                    wrapped.predict(wrapped.stand_in(x))
                    continue
                x, y = batch
                if wrapped is not None:
                    # One predict call per batch: the labels stay with their inputs.
                    pred = wrapped.predict(x, batch_size=max(1, x.shape[0]))
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


def _from_cache(
    wrapped: WrappedModel,
    data: Any,
    *,
    batch_size: int,
    progress: bool,
    desc: str,
    cache: CacheOption,
) -> SetOutputs:
    """Predictions of a wrapped model from the shared features of ``data``."""
    start = time.perf_counter()
    features, _ = wrapped.features_of(
        data, desc, batch_size=batch_size, progress=progress, cache=cache
    )
    prediction = wrapped.predict_features(features.features, batch_size).to("cpu")
    labels = None if features.labels is None else features.labels.cpu()
    return SetOutputs(prediction, labels, time.perf_counter() - start)


def _gather(local: SetOutputs) -> SetOutputs:
    """Every rank's outputs on its shard, in rank order (as they are in one process)."""
    if not distributed.active():
        return local
    p = local.prediction
    gather = distributed.gather_rows
    prediction = Prediction(
        gather(p.logits),
        gather(p.probs),
        gather(p.label),
        gather(p.confidence),
        {k: gather(v) for k, v in p.scores.items()},
        {k: gather(v) for k, v in p.outputs.items()},
        dict(p.kinds),
    )
    seconds = max(distributed.gather_rows(torch.tensor([local.seconds])).tolist())
    return SetOutputs(prediction, gather(local.labels), seconds)


def runner_for(model: nn.Module, cache: CacheOption = None) -> Runner:
    """How ``evaluate`` runs ``model`` over a data set: ``runner(data, batch_size,
    progress, desc) -> SetOutputs``, from the shared features when it can, on this
    rank's shard under ``torch.distributed`` (the outputs gathered on every rank)."""
    run = _local_runner(model, cache)

    def distributed_run(data: Any, **kw: Any) -> SetOutputs:
        if not distributed.active():
            return run(data, **kw)
        kw["progress"] = kw.get("progress", True) and distributed.rank() == 0
        local = distributed.agree(
            lambda: run(distributed.shard(data), **kw), f"evaluating on {kw.get('desc')}"
        )
        return _gather(local)

    return distributed_run


def _local_runner(model: nn.Module, cache: CacheOption) -> Runner:
    if cache is False:
        return lambda data, **kw: run_model(model, data, **kw)
    if isinstance(model, WrappedModel):
        target = model
    else:
        try:
            target = wrap(model)
            target.check_is_fitted()
        except (SplitError, TypeError, ValueError):
            return lambda data, **kw: run_model(model, data, **kw)
    if any(get_tags(p).needs_inputs for p in target.plugins):
        return lambda data, **kw: run_model(model, data, **kw)

    def run(data: Any, **kw: Any) -> SetOutputs:
        try:
            return _from_cache(target, data, cache=cache, **kw)
        except SplitError:
            if target is model:
                raise
            # A model that changes its last layer's output (softmax): run it as it is.
            return run_model(model, data, **kw)

    return run
