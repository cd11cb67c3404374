"""``WrappedModel``: a split classifier with plugins, for inference.

``wrapped(x)`` returns what the model returned with the calibrated logits in place (a
tensor for a model that returns logits; the same ``ModelOutput`` with new ``.logits``
for a Hugging Face classifier; the same tuple or dict for a model whose output holds
the logits), with the logits' shape, dtype and device, so it drops into code that used
the model; ``predict`` adds probabilities and every plugin's scores and outputs. Fitting
lives in :mod:`wrapcal.model.fitting`, assembly (wrap, load) in
:mod:`wrapcal.model.assemble`, files in :mod:`wrapcal.files.format`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypedDict, cast, overload

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wrapcal import distributed
from wrapcal.data import ArrayLike, DataSource, check_inputs, iter_batches, num_samples
from wrapcal.errors import DataError
from wrapcal.features.disk_arrays import DiskFeatures
from wrapcal.features.disk_store import DiskCache
from wrapcal.features.extract import FeatureSet
from wrapcal.features.memory_store import cached_features
from wrapcal.features.store import CacheOption
from wrapcal.files import format as saving
from wrapcal.files.preprocess import Preprocess, check_against
from wrapcal.model import fitting
from wrapcal.model.chain import CACHED_BATCH, Chain, PrefixView, named_errors
from wrapcal.model.operating_points import ACCEPT_RATE, check_accept_rates
from wrapcal.model.split import Split
from wrapcal.plugin.base import Plugin, get_tags, not_fitted_error
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.torch_helpers import check_batch, device_of, in_mode, input_hint

__all__ = ["WrappedModel"]

if TYPE_CHECKING:

    class PluginList(nn.ModuleList):
        """``WrappedModel.plugins`` as the type checker sees it: an ``nn.ModuleList``
        whose items are all plugins (only plugins are ever put in it)."""

        def __iter__(self) -> Iterator[Plugin]: ...

        @overload
        def __getitem__(self, idx: slice) -> nn.ModuleList: ...

        @overload
        def __getitem__(self, idx: int) -> Plugin: ...

        def __getitem__(self, idx: int | slice) -> Plugin | nn.ModuleList: ...


#: What ``fit_features`` takes per set: features ``[N, D]``, or ``(features, labels)``.
FeatureSource: TypeAlias = ArrayLike | DiskFeatures | tuple[ArrayLike | DiskFeatures, ArrayLike]


class KeepsOutput(Protocol):
    """A backbone that keeps the whole model's output for :func:`kept_output`."""

    keep_output: bool
    kept_output: tuple[object, torch.Tensor] | None


class KeptOutput(TypedDict, total=False):
    """What :func:`kept_output` yields: the model's output and the logits inside it."""

    output: object
    logits: torch.Tensor


class WrappedModel(nn.Module):
    """A classifier split into backbone and head, with plugins applied.

    Create it with :func:`wrapcal.wrap`; load a saved one with :func:`wrapcal.load`.
    It is an inference object: it starts in eval mode, and ``forward`` and ``predict``
    give the same answers (batch-norm running statistics, no dropout) unless you call
    ``wrapped.train()`` yourself, which only ``forward`` honours.

    Attributes:
        backbone: Inputs -> features ``[B, D]``.
        head: The model's head, features -> logits ``[B, K]``.
        plugins: The plugins, in the order they act (:mod:`wrapcal.model.ordering`).
        plugin_names: Their names, in the same order.
        num_classes: ``K`` (1 for a single-logit binary model).
        num_features: ``D``.
        input_shape: The shape of one input, as seen at ``fit`` or known from the model
            (``None`` when unknown).
        fixed_input_size: Whether the model takes only that spatial size (a ViT's
            patch grid), not just that number of channels.
        check_inputs: Refuse NaN/inf inputs and inputs of the wrong shape with a clear
            error (the default). Set it to ``False`` in serving, where inputs are
            trusted and the check's pass over the batch is not wanted.
        backbone_passes: How many passes over a data set the backbone has made.
        operating_points: Measured at ``fit`` on the calibration set: for each score the
            threshold accepting each of ``fit``'s ``accept_rates`` of it (95% by
            default), and its accuracy, ECE and NLL (:mod:`wrapcal.model.operating_points`);
            ``None`` before (or without calibration data). Saved with the model and
            written into exports.
        preprocess: What the model's inputs are (:class:`~wrapcal.Preprocess`: mean,
            std, size, channel order, value range), from ``wrap(..., preprocess=...)``
            or what the model says; ``None`` when unknown. Saved with the model and
            written into exports (and built into them with
            ``wrapcal.export(..., include_preprocessing=True)``). Assign a
            :class:`~wrapcal.Preprocess` or a dict of its fields to set it.
    """

    def __init__(self, split: Split, plugins: Sequence[tuple[str, Plugin]]) -> None:
        super().__init__()
        self.backbone = split.backbone
        self.head = split.head
        self.plugins = cast("PluginList", nn.ModuleList([plugin for _, plugin in plugins]))
        self.plugin_names = [name for name, _ in plugins]
        self.split_kind = split.kind
        self.source = dict(split.source)
        self.head_path = split.head_path
        self.num_classes = split.num_classes
        self.num_features = split.num_features
        self.input_shape: tuple[int, ...] | None = split.input_shape
        self.fixed_input_size = split.fixed_input_size
        self.check_inputs = True
        self.backbone_passes = 0
        self.operating_points: dict[str, Any] | None = None
        self._preprocess: Preprocess | None = None
        for index, (name, plugin) in enumerate(plugins):
            named_errors(name, plugin.attach, self.view(index))
        self.eval()

    # --- plugins -----------------------------------------------------------------------

    def chain(self, upto: int | None = None, *, check_finite: bool = False) -> Chain:
        """The plugins before index ``upto`` (all of them by default), as a chain
        (``check_finite``: refusing cached features with NaN or inf values)."""
        stop = len(self.plugins) if upto is None else upto
        triples = [
            (name, plugin, get_tags(plugin))
            for name, plugin in zip(
                self.plugin_names[:stop], list(self.plugins)[:stop], strict=True
            )
        ]
        hint = input_hint(self.input_shape, self.fixed_input_size)
        return Chain(
            self.backbone, self.head, triples, self.num_features, hint, check_finite=check_finite
        )

    def view(self, upto: int) -> PrefixView:
        """The model as plugin number ``upto`` sees it (the plugins before it active)."""
        return PrefixView(self, self.chain(upto))

    def get_plugin(self, name_or_type: str | type) -> Plugin:
        """The plugin registered under a name, or the first of a type."""
        for plugin, name in zip(self.plugins, self.plugin_names, strict=True):
            if name == name_or_type or (
                isinstance(name_or_type, type) and isinstance(plugin, name_or_type)
            ):
                return plugin
        raise KeyError(f"no plugin {name_or_type!r} in this model; it has {self.plugin_names}")

    def check_is_fitted(self) -> None:
        """Raise :class:`NotFittedError` naming every plugin that still needs ``fit``."""
        missing = [
            (name, plugin)
            for name, plugin in zip(self.plugin_names, self.plugins, strict=True)
            if get_tags(plugin).requires_fit and not plugin.fitted_
        ]
        if missing:
            # Each plugin's message names only the data sets its tags declare.
            raise not_fitted_error(missing)

    # --- description -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return device_of(self)

    @property
    def preprocess(self) -> Preprocess | None:
        """What the model's inputs are (class docstring), or ``None``."""
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: Preprocess | Mapping[str, Any] | None) -> None:
        if isinstance(value, Mapping):
            value = Preprocess.from_config(value)
        if value is not None and not isinstance(value, Preprocess):
            raise TypeError(
                "wrapped.preprocess takes a wrapcal.Preprocess, a dict of its fields or "
                f"None; got {type(value).__name__}"
            )
        check_against(value, self.input_shape, self.fixed_input_size)
        self._preprocess = value

    @property
    def model_name(self) -> str:
        """A readable name of the wrapped model, for messages."""
        inner = getattr(self.backbone, "model", self.backbone)
        return str(self.source.get("name") or type(inner).__name__)

    @property
    def num_classes_out(self) -> int:
        """Number of classes of the predictions (2 for a single-logit binary model)."""
        return max(self.num_classes, 2)

    # --- inference ---------------------------------------------------------------------

    def prepare(self, x: ArrayLike) -> torch.Tensor:
        """A batch of inputs as the backbone takes it: checked, on the model's device and
        in its dtype.

        Every path into the backbone goes through it (``forward``, ``predict``, the
        feature pass of ``fit`` and ``evaluate``), so inputs are refused the same way
        everywhere.

        Args:
            x: A batch ``[N, ...]`` (a tensor, or an array ``torch.as_tensor`` reads).

        Returns:
            The batch, moved and cast where needed (``x`` itself otherwise).

        Raises:
            DataError: Inputs that are not floating point, not a batch, or (with
                ``check_inputs``) of a shape the model cannot take or with NaN/inf
                values.
        """
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        check_inputs(x, self)
        if self.check_inputs:
            check_batch(x, self.input_shape, self.fixed_input_size)
        param = next(self.parameters(), None)
        if param is not None and (x.device != param.device or x.dtype != param.dtype):
            x = x.to(device=param.device, dtype=param.dtype)
        return x

    def stand_in(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """One input of zeros, for a padding round of a collective predict (a rank whose
        batches ran out while others still predict, see
        :func:`wrapcal.distributed.lockstep`): shaped like ``like`` (one of this rank's
        inputs), else like the inputs ``fit`` saw.

        Raises:
            DataError: No ``like`` and an input shape the model does not know yet.
        """
        if like is not None:
            return torch.zeros_like(like[:1])
        if self.input_shape is None:
            raise DataError("the model's input shape is unknown: fit it from data first")
        return self.prepare(torch.zeros(1, *self.input_shape))

    def features_of(
        self,
        data: DataSource,
        name: str = "data",
        *,
        batch_size: int = 256,
        progress: bool = False,
        cache: CacheOption = None,
    ) -> tuple[FeatureSet, bool]:
        """The backbone's features of a data set: one pass, or none when a feature store
        holds them already. The feature pass of ``fit`` and ``evaluate``.

        Args:
            data: Anything :func:`wrapcal.data.iter_batches` reads.
            name: The data set's name, for messages and the progress bar.
            batch_size: Batch size for data that is not already batched.
            progress: Show a progress bar.
            cache: The :class:`~wrapcal.features.store.FeatureStore`: ``None`` or
                ``True`` for the process-wide memory store, a
                :class:`~wrapcal.features.disk_store.DiskCache` for a directory,
                ``False`` to always run the backbone.

        Returns:
            The :class:`~wrapcal.features.extract.FeatureSet` (features ``[N, D]`` on the
            model's device, labels checked against ``num_classes_out``) and whether the
            backbone ran (``False``: the store held them). ``backbone_passes`` is left
            to the caller, which knows whether the pass counts as the model's.

        Raises:
            DataError: Empty data, bad inputs or labels, NaN/inf features.
        """
        return cached_features(
            self.backbone,
            self.prepare,
            data,
            name,
            num_features=self.num_features,
            num_classes=self.num_classes_out,
            batch_size=batch_size,
            progress=progress,
            cache=cache,
        )

    def members(self, x: torch.Tensor) -> torch.Tensor:
        """Member logits ``[M, B, K]`` of a batch (``M = 1`` without heads or samplers)."""
        self.check_is_fitted()
        chain = self.chain()
        return chain.members(chain.features(self.prepare(x)))

    def head_members(self, features: torch.Tensor) -> torch.Tensor:
        """Member logits ``[M, N, K]`` of backbone features ``[N, D]`` (no backbone pass)."""
        self.check_is_fitted()
        chain = self.chain()
        return chain.members(chain.features(None, features))

    def finish(self, members: torch.Tensor) -> torch.Tensor:
        """Final logits ``[B, K]`` of members ``[M, B, K]``: combined, then calibrated."""
        return self.chain().finish(members)[1]

    def forward(self, x: torch.Tensor) -> Any:
        """What the model returns, with the calibrated logits in place of its logits.

        A model that returns logits gets a tensor ``[B, K]`` (the model's dtype and
        device; ``[0, K]`` for an empty batch). A model whose output holds the logits
        (a Hugging Face ``ModelOutput``, a tuple or dict) gets that output, the same
        type, with the calibrated logits where its logits were: ``wrapped(x).logits``
        works where ``model(x).logits`` did. The backbone says what the model returned
        (:func:`kept_output`); ``predict`` and exports read the logits alone.
        """
        self.check_is_fitted()
        chain = self.chain()
        x = self.prepare(x)
        if x.shape[0] == 0:
            # The logits of one input of zeros, none kept: [0, K] in the logits' dtype.
            # Only the logits: no plugin's outputs, which may synchronise the ranks.
            with in_mode(self, False), torch.no_grad(), kept_output(self.backbone) as kept:
                logits = chain.logits(x.new_zeros(1, *x.shape[1:]))
            return _map_tensors(logits_in_place(kept.get("output"), kept, logits), _no_rows)
        with kept_output(self.backbone) as kept:
            logits = chain.logits(x)
        return logits_in_place(kept.get("output"), kept, logits)

    def _empty(self, chain: Chain, x: torch.Tensor) -> Prediction:
        """The prediction of an empty batch ``x`` (``[0, ...]``): every output with no
        rows and the shape and dtype it has for one input (the chain run on one input of
        zeros, in eval mode without gradients, none of its rows kept), so that code
        written for batches works on an empty one."""
        one = x.new_zeros(1, *x.shape[1:])
        with in_mode(self, False), torch.no_grad():
            return chain.empty_prediction(one, cached=False)

    def predict(self, x: DataSource, batch_size: int = 256, progress: bool = False) -> Prediction:
        """Predict with probabilities, labels, confidences, scores and plugin outputs.

        Runs in eval mode without gradients, whatever the model's mode.

        Args:
            x: A batch (tensor or array) or any data ``wrapcal.data`` reads.
            batch_size: Batch size when ``x`` is a data set.
            progress: Show a progress bar over batches.

        Returns:
            A :class:`~wrapcal.Prediction` on the model's device.
        """
        self.check_is_fitted()
        chain = self.chain()
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)  # a batch, as a tensor is (iter_batches reads both)
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == 0 and chain.runs_alone:
            return self._empty(chain, self.prepare(x))
        with in_mode(self, False), torch.no_grad():
            if isinstance(x, torch.Tensor) and x.shape[0] <= batch_size and not chain.collective:
                return chain.predict(self.prepare(x))
            last: list[torch.Tensor] = []  # this rank's latest batch, to shape padding

            def batches(bar: tqdm) -> Iterator[torch.Tensor]:
                for xb, _ in iter_batches(x, batch_size):
                    last[:] = [self.prepare(xb)]
                    yield last[0]
                    bar.update(xb.shape[0])

            def stand_in() -> torch.Tensor:
                return self.stand_in(last[0] if last else None)

            def run() -> list[Prediction]:
                with tqdm(
                    total=num_samples(x), desc="predict", unit="img", disable=not progress
                ) as bar:
                    parts = chain.predict_each(batches(bar), stand_in, cached=False)
                if not parts:
                    raise DataError("no inputs to predict: the data is empty")
                return parts

            # Collective inference: a rank that fails tells the others instead of
            # leaving them waiting in the next round.
            parts = distributed.agree(run, "predicting") if chain.collective else run()
            return Prediction.cat(parts)

    def predict_features(
        self, features: torch.Tensor | np.ndarray | DiskFeatures, batch_size: int = CACHED_BATCH
    ) -> Prediction:
        """Predict, with every plugin's outputs, from backbone features ``[N, D]``.

        ``features`` are ``wrapped.backbone`` outputs (the ``fit`` cache, or features a
        user stored); no backbone pass is made. They are checked as ``predict`` checks
        inputs (with ``check_inputs``: NaN and inf values are refused, batch by batch);
        no rows give an empty prediction.

        Raises:
            DataError: Features that are not ``[N, D]`` floats of the model's width, or
                (with ``check_inputs``) that hold NaN or inf values.
        """
        self.check_is_fitted()
        rows: torch.Tensor | DiskFeatures
        if isinstance(features, DiskFeatures):
            rows = features.to(self.device)  # rows are read batch by batch
        else:
            rows = torch.as_tensor(features).to(self.device)
        self._check_feature_shape(rows)
        view = PrefixView(self, self.chain(check_finite=self.check_inputs))
        with in_mode(self, False):
            return view.predict_features(rows, batch_size)

    def _check_feature_shape(self, features: torch.Tensor | DiskFeatures) -> None:
        """Refuse features that are not ``[N, D]`` floats: the backbone's output, never a
        problem of the split (which :func:`check_features` would say)."""
        shape = list(features.shape)
        width = self.num_features
        if not features.dtype.is_floating_point:
            raise DataError(
                f"features have dtype {features.dtype}; predict_features takes the backbone's "
                "float features [N, D]"
            )
        if len(shape) == 1 and shape[0] == width:
            raise DataError(
                f"features have shape {shape}: one row instead of a batch; add a batch "
                f"dimension with features.unsqueeze(0), giving [1, {width}]"
            )
        if len(shape) != 2 or shape[1] != width:
            raise DataError(
                f"features have shape {shape}; predict_features takes the backbone's "
                f"features [N, {width}] (wrapped.backbone(x), or what fit cached)"
            )

    def head_logits(
        self, features: torch.Tensor | DiskFeatures, batch_size: int = CACHED_BATCH
    ) -> torch.Tensor:
        """Final logits ``[N, K]`` from backbone features ``[N, D]``, every plugin applied
        (``[0, K]`` for no rows; NaN or inf features are refused with ``check_inputs``)."""
        if not isinstance(features, (torch.Tensor, DiskFeatures)):
            features = torch.as_tensor(features)
        self._check_feature_shape(features)
        return self.chain(check_finite=self.check_inputs).cached_logits(features, batch_size)

    # --- fitting and saving --------------------------------------------------------------

    def fit(
        self,
        train: DataSource | None = None,
        calibration: DataSource | None = None,
        unlabeled: DataSource | None = None,
        *,
        batch_size: int = 256,
        progress: bool = True,
        seed: int = 0,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        cache_dtype: str = "float32",
        accept_rates: Sequence[float] = (ACCEPT_RATE,),
        **more: DataSource | None,
    ) -> WrappedModel:
        """Fit every plugin, in stage order, from one backbone pass per data set read.

        Args:
            train: Labelled data to retrain on (label smoothing, discrepancy heads) or
                to learn in-distribution statistics from.
            calibration: Labelled held-out data for post-hoc calibration.
            unlabeled: Unlabelled data (production traffic) for the discrepancy heads.
            batch_size: Batch size of the backbone pass.
            progress: Show progress bars.
            seed: Seed of every random choice the plugins make.
            cache: Share backbone features with other wrapped variants of the same
                backbone and with ``wrapcal.evaluate`` (:mod:`wrapcal.features.memory_store`);
                ``False`` always runs the backbone.
            cache_dir: Keep the features in files under this directory instead of memory
                (data sets larger than memory; reused by later runs with the same weights
                and data): :mod:`wrapcal.features.disk_store`. Plugins then fit in bounded memory.
            cache_dtype: ``"float32"`` or ``"float16"`` (half the disk) for ``cache_dir``.
            accept_rates: The shares of the calibration set that the operating points'
                thresholds accept, one threshold per score and rate (``(0.95, 0.99)``;
                the first is ``operating_points["thresholds"]``), see
                :mod:`wrapcal.model.operating_points`.
            **more: Further named data sets a plugin reads (``conformal=...``).

        Returns:
            self

        Raises:
            ValueError: ``accept_rates`` are not distinct shares in (0, 1] (before any
                backbone pass).
        """
        sets = {"train": train, "calibration": calibration, "unlabeled": unlabeled, **more}
        store: CacheOption = cache
        if cache_dir is not None and cache is not False:
            store = DiskCache(cache_dir, cache_dtype)
        options = {
            "batch_size": batch_size,
            "progress": progress,
            "seed": seed,
            "cache": store,
            "accept_rates": check_accept_rates(accept_rates),
        }
        return fitting.fit_from_data(self, sets, options)

    def fit_features(
        self,
        train: FeatureSource | None = None,
        calibration: FeatureSource | None = None,
        unlabeled: FeatureSource | None = None,
        *,
        progress: bool = True,
        seed: int = 0,
        accept_rates: Sequence[float] = (ACCEPT_RATE,),
        **more: FeatureSource | None,
    ) -> WrappedModel:
        """Fit from features already computed with ``wrapped.backbone``.

        Each argument is ``(features, labels)`` or bare ``features`` (``[N, D]``).
        Plugins that stream data through the network cannot be fitted this way.
        ``accept_rates`` as for :meth:`fit`.
        """
        sets = {"train": train, "calibration": calibration, "unlabeled": unlabeled, **more}
        options = {
            "progress": progress,
            "seed": seed,
            "accept_rates": check_accept_rates(accept_rates),
        }
        return fitting.fit_from_features(self, sets, options)

    def save(self, path: str | Path) -> Path:
        """Save weights (safetensors) and configuration (JSON) in one file."""
        return saving.save(self, path)


# --- the model's own output, calibrated logits in place ---------------------------------------


@contextlib.contextmanager
def kept_output(backbone: nn.Module) -> Iterator[KeptOutput]:
    """Ask a backbone that can to keep what the whole model returned, for one pass.

    The protocol (duck-typed, so the core names no adapter): a backbone whose model's
    output is more than the logits has a ``keep_output`` attribute; while it is
    ``True`` the backbone sets ``kept_output = (output, logits)`` at each pass, the
    model's output and the logits inside it (the object itself). The dict this yields
    then holds ``"output"`` and ``"logits"``; it is empty for other backbones.
    """
    found: KeptOutput = {}
    if not hasattr(backbone, "keep_output"):
        yield found
        return
    keeper = cast(KeepsOutput, backbone)  # it follows the protocol: it has keep_output
    keeper.keep_output = True
    keeper.kept_output = None
    try:
        yield found
        kept = keeper.kept_output
        if kept is not None:
            found["output"], found["logits"] = kept
    finally:
        keeper.keep_output = False
        keeper.kept_output = None  # do not keep the batch alive


def logits_in_place(output: object, kept: KeptOutput, logits: torch.Tensor) -> Any:
    """``output`` (what the model returned) with ``logits`` where its logits were.

    The model's logits are found by identity (``kept["logits"]``), else under the key
    or attribute ``logits``; a tensor output, or none, gives ``logits`` itself. A
    ``ModelOutput`` or dict is rebuilt as the same type with the same fields; a tuple
    (a named one too) or list as the same type with the same items.
    """
    raw = kept.get("logits")
    if output is None or isinstance(output, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        fields = dict(output.items())
        key = next((k for k, v in fields.items() if v is raw), "logits")
        fields[key] = logits
        if type(output) is dict:
            return fields
        return type(output)(**fields)
    if isinstance(output, (tuple, list)):
        items = [logits if item is raw else item for item in output]
        if hasattr(output, "_fields"):  # a named tuple
            return type(output)(*items)
        return type(output)(items)
    return logits


def _no_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:0] if tensor.ndim else tensor


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it (tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        fields = {k: _map_tensors(v, fn) for k, v in value.items()}
        return fields if type(value) is dict else type(value)(**fields)
    if isinstance(value, (tuple, list)):
        items = [_map_tensors(v, fn) for v in value]
        if hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items)
    return value
