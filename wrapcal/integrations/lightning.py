"""Lightning: wrap, fit, report and save the trained module when ``trainer.fit`` ends.

``pip install 'wrapcal[lightning]'``. Lightning is imported by this module only: ``import
wrapcal`` never imports it.

>>> from wrapcal.integrations.lightning import WrapcalCallback  # doctest: +SKIP
>>> callback = WrapcalCallback(["temperature", "knn"], test=test_data)  # doctest: +SKIP
>>> trainer = lightning.Trainer(max_epochs=10, callbacks=[callback])  # doctest: +SKIP
>>> trainer.fit(module, train_loader, val_loader)  # doctest: +SKIP
>>> callback.wrapped_.predict(images)  # doctest: +SKIP
>>> wrapcal.load(callback.saved_to_, model=MyModule())  # doctest: +SKIP

When the fit ends (``on_fit_end``: training done, the last checkpoint written, the module
moved back to the CPU by Lightning), the callback:

1. takes the classifier: the ``LightningModule`` itself (its ``forward`` must return the
   logits), or the submodule named by ``model_attr`` (``"net"``), and wraps a copy of it
   with the plugins (:func:`wrapcal.wrap`: timm and torchvision models are split by their
   adapters, any other module at its last ``nn.Linear``, or at ``head=``). The trained
   module is never changed;
2. moves the copy to the trainer's device (``trainer.strategy.root_device``) and fits the
   plugins with one backbone pass per data set some plugin reads: ``calibration`` is the
   trainer's validation dataloader, ``train`` its training dataloader (read only when a
   plugin reads ``train``: KNN, Mahalanobis, ...); ``fit_data`` replaces or adds sets;
3. measures the report (:func:`wrapcal.evaluate`: the trained classifier as ``baseline``
   beside the ``wrapped`` one, on ``test``, or on the validation data when no ``test`` is
   given, and on the ``ood`` sets) and logs its numbers to every logger of the trainer
   (``log_metrics``), with a few settings (``log_hyperparams``);
4. saves the wrapped model (``wrapped.save``) beside the checkpoints
   (``trainer.checkpoint_callback.dirpath``, else ``trainer.default_root_dir``), as
   ``model.wrapcal`` by default.

Afterwards ``callback.wrapped_`` is the wrapped model (on the trainer's device),
``callback.report_`` the :class:`~wrapcal.report.Report`, ``callback.metrics_`` the
numbers logged and ``callback.saved_to_`` the file written.

Metric names: ``<prefix>/<data>/`` and the names of
:func:`wrapcal.report.tracking.flat_metrics` (the names MLflow logging uses), where
``<data>`` is ``test``, or ``val`` when the report is measured on the validation data
(which calibrated the plugins: in-sample for them). For example
``wrapcal/test/calibration/wrapped/ece``, ``wrapcal/test/calibration/baseline/nll``,
``wrapcal/test/ood/wrapped/noise/knn/auroc`` and
``wrapcal/test/summary/wrapped/noise/auroc`` (the best score's). Fractions, as in
``report.json``; ECE is top-label, L1, 15 equal-width bins; in-distribution is the
positive class of AUROC.

Under DDP every rank takes part in the fit and the report, each on its shard: wrapcal's
``fit`` and ``evaluate`` are collective under an initialised process group
(:mod:`wrapcal.distributed`), so running them on rank zero alone would leave it waiting
for the others. The trainer's loaders carry Lightning's ``DistributedSampler``, which
wrapcal takes as the shards (it pads them to equal sizes with a few repeated rows); data
given to the callback as tensors is cut into shards by wrapcal. Rank zero alone logs and
saves; every rank ends with the same ``wrapped_`` and ``report_``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as err:  # the extra is not installed
    raise ImportError(
        "wrapcal.integrations.lightning needs Lightning: pip install 'wrapcal[lightning]'"
    ) from err

from wrapcal import distributed
from wrapcal._version import __version__
from wrapcal.errors import DataError, SplitError
from wrapcal.model.assemble import PluginSpec, resolve_plugins, wrap
from wrapcal.model.fitting import read_sets
from wrapcal.model.wrapped import WrappedModel
from wrapcal.plugin.base import get_tags
from wrapcal.report.evaluate import evaluate
from wrapcal.report.report import Report
from wrapcal.report.tracking import flat_metrics

__all__ = ["WrapcalCallback"]

#: The fix for a missing validation dataloader, in every message that needs it.
_VAL_FIX = (
    "give the trainer a validation dataloader (trainer.fit(module, train_loader, "
    "val_loader), a LightningDataModule.val_dataloader, or the module's val_dataloader; "
    "with limit_val_batches > 0), or pass the data to the callback: "
    "WrapcalCallback(..., fit_data={'calibration': loader})"
)


class WrapcalCallback(pl.Callback):
    """Wrap the trained module with wrapcal plugins when ``trainer.fit`` ends; fit,
    report, log and save it.

    Args:
        plugins: The plugins, as :func:`wrapcal.wrap` takes them: names
            (``"temperature"``), ``(name, params)`` pairs or plugin instances.
        model_attr: The dotted name of the classifier inside the ``LightningModule``
            (``"net"``, ``"model.classifier"``); ``None`` wraps the module itself, whose
            ``forward`` must then return the logits. Loading the saved file takes the
            same architecture: ``wrapcal.load(path, model=MyModule())``, or
            ``model=MyModule().net`` with ``model_attr="net"``.
        head: The dotted name of the final linear layer inside the classifier, to split
            there by hand (:func:`wrapcal.wrap`'s ``head``).
        fit_data: Data sets for ``wrapped.fit`` that replace or add to the trainer's
            loaders (``{"calibration": loader}``, ``{"unlabeled": traffic}``); anything
            :mod:`wrapcal.data` reads.
        test: Labelled data to measure the report on; ``None`` measures it on the
            validation data (the calibration data: in-sample for the calibrators), and
            the metric names say ``val`` instead of ``test``.
        ood: Out-of-distribution data sets by name, for the report's OOD metrics.
        report: Measure the report and log it to the trainer's loggers.
        save_to: The file to save the wrapped model to; ``None`` saves it as
            ``filename`` in the checkpoint directory
            (``trainer.checkpoint_callback.dirpath``, else ``trainer.default_root_dir``);
            ``False`` does not save.
        filename: The file name used when ``save_to`` is ``None``.
        batch_size: Batch size of the backbone pass for data that is not already batched
            (tensors); loaders keep their own.
        bootstrap: Bootstrap resamples of the report's 95% intervals (ECE, AUROC);
            0 (the default) skips them.
        seed: Seed of the plugins' random choices and of the bootstrap.
        prefix: The first part of every logged name.

    Attributes:
        wrapped_: The fitted :class:`~wrapcal.WrappedModel`, on the trainer's device.
        report_: The :class:`~wrapcal.report.Report` (``None`` with ``report=False``, or
            when there was no data to measure it on).
        metrics_: The numbers logged, by name.
        saved_to_: The file written (``None`` when not saving).

    Raises:
        PluginNotFoundError, TypeError, ValueError: Bad ``plugins`` (at construction).
    """

    def __init__(
        self,
        plugins: Sequence[PluginSpec] = ("temperature",),
        *,
        model_attr: str | None = None,
        head: str | None = None,
        fit_data: Mapping[str, Any] | None = None,
        test: Any = None,
        ood: Mapping[str, Any] | None = None,
        report: bool = True,
        save_to: str | os.PathLike[str] | Literal[False] | None = None,
        filename: str = "model.wrapcal",
        batch_size: int = 256,
        bootstrap: int = 0,
        seed: int = 0,
        prefix: str = "wrapcal",
    ) -> None:
        super().__init__()
        self._report_on = "test"
        # Resolve now so that a misspelt plugin fails before training, not after it; the
        # fit wraps new instances of the plugins given by name (instances are used as given).
        self._tags = [(name, get_tags(plugin)) for name, plugin in resolve_plugins(plugins)]
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(
                f"model_attr must be the dotted name of a submodule ('net'), or None for the "
                f"LightningModule itself; got {model_attr!r}"
            )
        if ood is not None and not isinstance(ood, Mapping):
            raise TypeError(f"ood must be a dict name -> data; got {type(ood).__name__}")
        if fit_data is not None and not isinstance(fit_data, Mapping):
            raise TypeError(
                f"fit_data must be a dict of data sets (e.g. {{'calibration': loader}}); got "
                f"{type(fit_data).__name__}"
            )
        if (
            save_to is not None
            and save_to is not False
            and not isinstance(save_to, (str, os.PathLike))
        ):
            raise TypeError(f"save_to must be a path, None or False; got {save_to!r}")
        self.plugins = list(plugins)
        self.model_attr = model_attr
        self.head = head
        self.fit_data = dict(fit_data or {})
        self.test = test
        self.ood = dict(ood or {})
        self.report = report
        self.save_to = save_to
        self.filename = filename
        self.batch_size = batch_size
        self.bootstrap = bootstrap
        self.seed = seed
        self.prefix = prefix
        self.wrapped_: WrappedModel | None = None
        self.report_: Report | None = None
        self.metrics_: dict[str, float] = {}
        self.saved_to_: Path | None = None

    # --- Lightning hooks ------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check, before training, what would otherwise fail after it: the classifier
        exists, and a plugin that needs calibration data will have it."""
        self._classifier(pl_module)
        if "calibration" in self._required() and "calibration" not in self.fit_data:
            problem = _no_validation(trainer)
            if problem:
                raise DataError(
                    f"plugin {self._needing('calibration')} needs calibration data, and "
                    f"{problem}: {_VAL_FIX}"
                )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap, fit, report, log and save (see the module's documentation)."""
        classifier = self._classifier(pl_module)
        device = trainer.strategy.root_device
        progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
        try:
            wrapped = wrap(classifier, self.plugins, head=self.head).to(device)
            sets = self._fit_sets(trainer, wrapped)
            wrapped.fit(**sets, batch_size=self.batch_size, progress=progress, seed=self.seed)
        except SplitError as err:
            raise SplitError(
                f"{err}. With WrapcalCallback: name the classifier inside the LightningModule "
                "with model_attr='...' (its forward must return the logits), or its final "
                "linear layer with head='...'"
            ) from err
        self.wrapped_ = wrapped
        self.report_ = self._measure(trainer, classifier, wrapped, sets) if self.report else None
        # A sharded KNN bank (shard_bank=True under DDP) is gathered on every rank: the
        # model is then whole everywhere, and can be saved.
        distributed.unshard(wrapped)
        self.saved_to_ = self._save(trainer, wrapped)
        self.metrics_ = self._metrics()
        if trainer.is_global_zero:
            self._log(trainer, wrapped)

    # --- steps ----------------------------------------------------------------------------

    def _classifier(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        try:
            found = pl_module.get_submodule(self.model_attr)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(
                f"{type(pl_module).__name__} has no submodule {self.model_attr!r} "
                f"(model_attr); its submodules are {children}. Name the one that maps "
                "inputs to logits, or pass model_attr=None to wrap the LightningModule itself"
            ) from None
        return found

    def _required(self) -> set[str]:
        return {name for _, tags in self._tags for name in tags.fit_requires}

    def _needing(self, data_set: str) -> str:
        return ", ".join(name for name, tags in self._tags if data_set in tags.fit_requires)

    def _fit_sets(self, trainer: pl.Trainer, wrapped: WrappedModel) -> dict[str, Any]:
        """The data sets of ``wrapped.fit``: ``fit_data``, then the trainer's loaders for
        the sets some plugin reads (none read twice, none read for nothing)."""
        reads, needs = read_sets(wrapped)
        required = {name for sets in needs.values() for name in sets}
        sets = dict(self.fit_data)
        if "calibration" in reads and "calibration" not in sets:
            loader = _single(trainer.val_dataloaders, "validation", "calibration")
            if loader is not None:
                sets["calibration"] = loader
            elif "calibration" in required:
                raise DataError(
                    f"plugin {self._needing('calibration')} needs calibration data, and the "
                    f"trainer has no validation dataloader: {_VAL_FIX}"
                )
        if "train" in reads and "train" not in sets:
            loader = _single(trainer.train_dataloader, "training", "train")
            if loader is not None:
                sets["train"] = loader
        return sets

    def _measure(
        self,
        trainer: pl.Trainer,
        classifier: nn.Module,
        wrapped: WrappedModel,
        sets: dict[str, Any],
    ) -> Report | None:
        data, self._report_on = self.test, "test"
        if data is None:
            data, self._report_on = sets.get("calibration"), "val"
            if data is None:
                data = _single(trainer.val_dataloaders, "validation", "calibration")
        if data is None:
            rank_zero_warn(
                "WrapcalCallback: no data to measure the report on; pass test=... or give "
                "the trainer a validation dataloader. Nothing is logged."
            )
            return None
        # The baseline is the trained classifier, on the same device as the wrapped one
        # (a plugin-less copy: the module itself stays where Lightning left it). Its
        # backbone has the same weights, so evaluate shares one pass per data set
        # between the two, and reuses the fit's features of the validation data.
        baseline = wrap(classifier, [], head=self.head).to(wrapped.device)
        return evaluate(
            {"baseline": baseline, "wrapped": wrapped},
            test=data,
            ood=self.ood,
            batch_size=self.batch_size,
            progress=trainer.progress_bar_callback is not None and trainer.is_global_zero,
            bootstrap=self.bootstrap,
            seed=self.seed,
        )

    def _target(self, trainer: pl.Trainer) -> Path:
        if self.save_to is not None and self.save_to is not False:
            return Path(self.save_to)
        checkpoints = trainer.checkpoint_callback
        folder = getattr(checkpoints, "dirpath", None) or trainer.default_root_dir
        return Path(folder) / self.filename

    def _save(self, trainer: pl.Trainer, wrapped: WrappedModel) -> Path | None:
        if self.save_to is False:
            return None
        path = self._target(trainer)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path = wrapped.save(path)
        # No rank goes on (to load the file, say) before rank zero has written it.
        trainer.strategy.barrier("wrapcal: saved")
        return path

    def _metrics(self) -> dict[str, float]:
        if self.report_ is None:
            return {}
        flat = flat_metrics(self.report_.to_dict())
        return {f"{self.prefix}/{self._report_on}/{name}": value for name, value in flat.items()}

    def _log(self, trainer: pl.Trainer, wrapped: WrappedModel) -> None:
        params = {
            f"{self.prefix}/plugins": ", ".join(wrapped.plugin_names),
            f"{self.prefix}/model": self.model_attr or type(trainer.lightning_module).__name__,
            f"{self.prefix}/backbone_passes": wrapped.backbone_passes,
            f"{self.prefix}/saved_to": str(self.saved_to_) if self.saved_to_ else "",
            f"{self.prefix}/version": __version__,
        }
        if self.report_ is not None:
            params[f"{self.prefix}/report_on"] = self._report_on
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            if self.metrics_:
                logger.log_metrics(self.metrics_, step=trainer.global_step)
            # Written now: the callback runs after Lightning's last flush of the logs.
            logger.save()


def _no_validation(trainer: pl.Trainer) -> str | None:
    """Why the trainer will not load a validation dataloader, or ``None`` if it will (or
    if this version of Lightning does not say)."""
    if trainer.limit_val_batches == 0:
        return "Trainer(limit_val_batches=0) never loads the validation dataloader"
    # Lightning's own record of where the validation loader comes from (not public API:
    # when it is missing the check waits for the end of the fit).
    source = getattr(
        getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None),
        "_data_source",
        None,
    )
    is_defined = getattr(source, "is_defined", None)
    if callable(is_defined) and not is_defined():
        return "the trainer has no validation dataloader"
    return None


def _single(loaders: Any, kind: str, data_set: str) -> Any:
    """The one loader of the trainer's ``kind`` dataloaders (``None`` when it has none)."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)) and not isinstance(loaders, DataLoader):
        if len(loaders) == 1:
            return loaders[0]
        if not loaders:
            return None
    elif not isinstance(loaders, Mapping):
        return loaders
    raise DataError(
        f"the trainer has {len(loaders)} {kind} dataloaders and wrapcal reads one {data_set} "
        f"set: choose it with WrapcalCallback(..., fit_data={{'{data_set}': loader}})"
    )
