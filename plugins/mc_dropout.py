"""MC dropout: uncertainty from any classifier at about the cost of one forward pass.

Monte Carlo dropout (Gal & Ghahramani 2016) keeps dropout stochastic at inference and
averages the softmax outputs of ``T`` sampled networks; the spread of the samples
separates total uncertainty into its aleatoric and epistemic parts (Kendall & Gal
2017). Only dropout is sampled: BatchNorm and every other module stay in eval mode.

Two scopes:

* ``scope="head"`` (default): dropout on the head's input features only. The backbone
  runs once; the ``T`` samples of the head are drawn in one batched call on the
  features, so the cost is one forward pass plus ``T`` cheap head evaluations. Most
  classifiers already have dropout there (timm's ``drop_rate``, torchvision's
  ``classifier = Sequential(Dropout, Linear)``), and then this is exactly the model's own
  dropout, sampled. Models without it (torchvision's ResNet, timm models created with
  ``drop_rate=0``) get a dropout they were not trained with, which the plugin warns
  about; ``finetune=True`` retrains the head with it on the cached training features.
* ``scope="all"``: every dropout module in the network is sampled, ``T`` full passes
  (batched: the input is repeated ``T`` times, in chunks of at most ``max_batch`` rows).

The ``T`` head masks are *consistent* (Kirsch et al. 2019, BatchBALD): sample ``t`` uses
one mask for every input, i.e. ``T`` fixed thinned networks, drawn from a generator
seeded with ``seed`` at every call. So a given input gets the same output whatever
batch it is in, and saved and loaded models agree exactly. ``scope="all"`` draws fresh
masks for every row of every chunk, also from a generator reseeded at every call, so
its outputs are reproducible for the same batch and ``max_batch``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wrapcal import Plugin, Stage, hookimpl
from wrapcal.probs import entropy, logits_to_log_probs, logits_to_probs
from wrapcal.split import TappedBackbone

#: Head dropout rate when the model has none: the rate most current recipes train with
#: (ViT, BERT), small because the head was not trained with dropout. Measured on the CIFAR
#: ResNet-20 (CIFAR-10 JPEG test vs MNIST, T=30, no fine-tuning): p=0.1 keeps accuracy
#: (81.1% vs 81.0% bare), ECE 9.1% vs 12.5%, MI AUROC 0.64; Gal & Ghahramani's p=0.5 gives
#: MI AUROC 0.56 and FPR@95 0.999. Larger rates are a choice for models trained with them.
DEFAULT_P = 0.1

#: The modules ``scope="all"`` samples. ``DropPath`` (stochastic depth) is not dropout.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
_ALPHA_DROPOUT = (nn.AlphaDropout, nn.FeatureAlphaDropout)
#: SELU's negative saturation, as in PyTorch's alpha dropout.
_SELU_ALPHA = 1.7580993408473766

#: At most this many feature elements per batched head call (``T * rows * D``), so that
#: ``head_logits`` over a whole data set does not allocate ``T`` copies of it at once.
_HEAD_CHUNK_ELEMENTS = 1 << 25
#: Mini-batch size of the head fine-tuning.
_FINETUNE_BATCH = 256
SCOPES = ("head", "all")


def _model_of(wrapped: Any) -> nn.Module:
    """The user's model inside the backbone (the split keeps it whole, head replaced)."""
    backbone = wrapped.backbone
    return backbone.model if isinstance(backbone, TappedBackbone) else backbone


def model_name(wrapped: Any) -> str:
    """A readable name of the wrapped model, for messages."""
    return str(wrapped.source.get("name") or type(_model_of(wrapped)).__name__)


def _head_slot(wrapped: Any) -> str | None:
    """The dotted name, inside the model, of the module that stands where the head was."""
    model = _model_of(wrapped)
    if wrapped.head_path is not None:
        return wrapped.head_path
    if wrapped.split_kind == "timm" and hasattr(model, "get_classifier"):
        # reset_classifier(0) put an Identity where the classifier was: find it.
        slot = model.get_classifier()
        for name, module in model.named_modules():
            if module is slot:
                return name
    return None


def find_head_dropout(wrapped: Any) -> tuple[float, str | None]:
    """The dropout the model applies to the head's input.

    Looks, in order, for a dropout module registered just before the head (torchvision's
    ``classifier = Sequential(Dropout, Linear)``, timm's ``head_drop`` / ``head.drop``,
    ``self.drop = nn.Dropout(p); self.fc = nn.Linear(...)`` in a hand-written model), then
    for timm's ``drop_rate``, which resnet, efficientnet and mobilenetv3 apply with
    ``F.dropout`` in ``forward_head``.

    Returns:
        ``(rate, module name)``; the name is ``None`` when the dropout is functional, and
        the rate is 0 when the model has no head dropout.
    """
    model = _model_of(wrapped)
    slot = _head_slot(wrapped)
    if slot is not None:
        # Pre-order: the entry before the head is the last leaf registered before it.
        names = list(model.named_modules())
        index = next((i for i, (name, _) in enumerate(names) if name == slot), 0)
        if index > 0:
            name, module = names[index - 1]
            if isinstance(module, DROPOUT_TYPES) and module.p > 0:
                return float(module.p), name
    rate = getattr(model, "drop_rate", 0.0)
    if wrapped.split_kind == "timm" and isinstance(rate, (int, float)) and rate > 0:
        return float(rate), None
    return 0.0, None


def dropout_modules(module: nn.Module) -> list[str]:
    """Names of the dropout modules with a rate above 0 in ``module``."""
    return [name for name, m in module.named_modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]


def seeded_dropout(
    x: torch.Tensor, p: float, generator: torch.Generator, kind: type[nn.Module] = nn.Dropout
) -> torch.Tensor:
    """Dropout of rate ``p`` like ``kind`` in train mode, with masks from ``generator``.

    Elementwise for ``nn.Dropout``, one mask per (sample, channel) for the ``Dropout1d``
    ... ``3d`` and ``FeatureAlphaDropout`` kinds, and SELU-preserving for the alpha kinds,
    with PyTorch's formulas.
    """
    if p == 0:
        return x
    channel = issubclass(kind, _CHANNEL_DROPOUT)
    shape = (*x.shape[:2], *([1] * (x.ndim - 2))) if channel else x.shape
    keep = (torch.rand(shape, generator=generator, device=x.device) >= p).to(x.dtype)
    if issubclass(kind, _ALPHA_DROPOUT):
        a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
        return x * (keep * a) + (keep - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
    return x * keep / (1 - p)


class MCDropout(Plugin):
    """MC dropout: T dropout samples of the head (one backbone pass) or of the whole net.

    Scores (higher = more uncertain): ``predictive_entropy`` (total), ``expected_entropy``
    (aleatoric), ``mutual_information`` (epistemic = total - aleatoric), ``variation_ratio``
    (1 - share of samples voting for the modal class) and ``std_top_prob`` (standard
    deviation over samples of the probability of the predicted class). They are computed
    on the members' softmax outputs, before any logit transform (temperature); with
    other head-members plugins inside (discrepancy heads) every member counts as a sample.

    Args:
        samples: Number of dropout samples ``T``.
        p: Dropout rate on the head's input features. ``None``: the model's own head
            dropout if it has one, else :data:`DEFAULT_P` (with a warning). With
            ``scope="all"`` the default adds only a functional head dropout (timm's
            ``drop_rate``), since dropout modules are sampled where they are.
        scope: ``"head"`` (one backbone pass) or ``"all"`` (``T`` full passes).
        finetune: Retrain the head with the dropout, on ``wrapped.fit(train=...)``'s
            cached features (cross-entropy, Adam, mini-batches of 256), so a head that
            never saw dropout learns to work with it. Only the model's own head
            (``wrapped.head``) is trained. ``scope="head"`` only.
        epochs: Epochs of the fine-tuning.
        lr: Adam's learning rate for the fine-tuning.
        seed: Seed of the dropout masks at inference (the fine-tuning uses ``fit``'s).
        max_batch: ``scope="all"``: at most this many input rows per backbone call.
    """

    stage = Stage.SAMPLE
    changes_backbone = False

    def __init__(
        self,
        samples: int = 30,
        p: float | None = None,
        scope: str = "head",
        finetune: bool = False,
        epochs: int = 5,
        lr: float = 1e-3,
        seed: int = 0,
        max_batch: int = 256,
    ) -> None:
        super().__init__()
        self.samples = samples
        self.p = p
        self.scope = scope
        self.finetune = finetune
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.max_batch = max_batch

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        """Only fine-tuning learns anything; plain MC dropout works right after ``wrap``."""
        return bool(self.finetune)

    # --- set-up ------------------------------------------------------------------------

    def _check_params(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"mc_dropout: samples must be an int >= 1, got {self.samples!r}")
        if self.p is not None and not 0 <= self.p < 1:
            raise ValueError(f"mc_dropout: p must be in [0, 1) or None, got {self.p!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"mc_dropout: scope must be one of {SCOPES}, got {self.scope!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"mc_dropout: max_batch must be an int >= 1, got {self.max_batch!r}")
        if self.finetune and self.scope != "head":
            raise ValueError(
                "mc_dropout: finetune=True retrains the head from cached features, which "
                "cannot sample the backbone's dropout; use scope='head' with finetune=True, "
                "or scope='all' with finetune=False"
            )
        if self.finetune and (self.epochs < 1 or self.lr <= 0):
            raise ValueError(
                f"mc_dropout: finetune needs epochs >= 1 and lr > 0, got {self.epochs}, {self.lr}"
            )

    @hookimpl
    def wrapcal_attach(self, wrapped: Any) -> None:
        """Resolve the dropout rates from the model; check that ``scope`` can work."""
        self._check_params()
        head_rate, head_module = find_head_dropout(wrapped)
        self.head_module_ = head_module
        if self.scope == "head":
            self.p_ = float(self.p) if self.p is not None else (head_rate or DEFAULT_P)
            self.pass_p_ = 0.0
            if head_rate == 0 and self.p_ > 0 and not self.finetune:
                warnings.warn(
                    f"mc_dropout: {model_name(wrapped)} has no dropout before its head; "
                    f"inserting dropout (p={self.p_}) on the head's input features, which "
                    "the model was not trained with: predictions stay close to the model's "
                    "own, but the spread of the samples is not calibrated. Pass "
                    "finetune=True and call wrapped.fit(train=...) to retrain the head "
                    "with it",
                    UserWarning,
                    stacklevel=2,
                )
            return
        self.dropout_modules_ = dropout_modules(wrapped.backbone)
        # The head's dropout, applied after every sampled pass, is only needed when it is
        # not a module (modules are sampled in place) or when the user asked for it.
        functional = head_rate if head_module is None else 0.0
        self.pass_p_ = float(self.p) if self.p is not None else functional
        # Cached features (wrapped.head_logits during a later plugin's fit) cannot rerun
        # the backbone: there only the head's dropout is sampled.
        self.p_ = float(self.p) if self.p is not None else head_rate
        if not self.dropout_modules_ and self.pass_p_ == 0:
            raise ValueError(
                f"mc_dropout: scope='all' samples the network's dropout, but "
                f"{model_name(wrapped)} has none (no dropout module with p > 0 and no head "
                "dropout rate). Use scope='head', which inserts dropout before the head "
                "(finetune=True retrains the head with it), or pass p to drop features"
            )
        if set(self.dropout_modules_) <= {head_module}:
            warnings.warn(
                f"mc_dropout: {model_name(wrapped)}'s only dropout is at its head, so "
                "scope='all' draws the same samples as scope='head' at T times the cost",
                UserWarning,
                stacklevel=2,
            )

    def get_state(self) -> dict[str, Any]:
        """The resolved rates, so a loaded model samples exactly as the saved one."""
        return {**super().get_state(), "p_": self.p_, "pass_p_": self.pass_p_}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.p_ = float(state.get("p_", self.p_))
        self.pass_p_ = float(state.get("pass_p_", self.pass_p_))

    # --- fitting -----------------------------------------------------------------------

    @hookimpl
    def wrapcal_fit(self, wrapped: Any, data: Any) -> None:
        """With ``finetune=True``: train ``wrapped.head`` under dropout on the train features."""
        if not self.finetune:
            return
        train = data.require(
            "train", "mc_dropout", "finetune=True retrains the head with dropout on it"
        )
        labels = train.require_labels("mc_dropout")
        finetune_head(
            wrapped.head,
            train.features,
            labels,
            p=self.p_,
            epochs=self.epochs,
            lr=self.lr,
            seed=int(data.options.get("seed", 0)),
            progress=bool(data.options.get("progress", True)),
        )

    # --- sampling ----------------------------------------------------------------------

    def _generator(self, device: torch.device, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + offset)

    def feature_masks(
        self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The ``T`` head-dropout masks ``[T, width]``, already scaled by ``1 / (1 - p)``.

        The same for every call (the generator is reseeded), so every input sees the same
        ``T`` thinned heads.
        """
        device = torch.device(device)
        keep = torch.rand(self.samples, width, generator=self._generator(device), device=device)
        return (keep >= self.p_).to(dtype) / (1 - self.p_)

    @hookimpl
    def wrapcal_features(self, wrapped: Any, inputs: torch.Tensor) -> torch.Tensor | None:
        """``scope="all"``: ``T`` passes with the backbone's dropout sampled, ``[T, B, D]``."""
        if self.scope != "all":
            return None
        generator = self._generator(inputs.device)
        modules = [wrapped.backbone.get_submodule(name) for name in self.dropout_modules_]

        def sample(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            # A module in train mode (the user is training) already drops: leave it.
            if module.training:
                return None
            return seeded_dropout(args[0], module.p, generator, type(module))

        # Forward hooks replace each dropout module's (eval-mode, identity) output: the
        # same as switching only those modules to train mode, but with our generator
        # instead of the global RNG. BatchNorm and the rest never leave eval mode.
        handles = [m.register_forward_hook(sample) for m in modules]
        batch, total = inputs.shape[0], self.samples
        per_chunk = max(1, self.max_batch // max(batch, 1))
        parts = []
        try:
            for start in range(0, total, per_chunk):
                n = min(per_chunk, total - start)
                repeated = inputs.repeat(n, *([1] * (inputs.ndim - 1)))
                features = wrapped.backbone(repeated)
                if features.ndim != 2:
                    raise ValueError(
                        f"mc_dropout: the backbone returned features of shape "
                        f"{tuple(features.shape)}, expected [batch, features]"
                    )
                parts.append(features.reshape(n, batch, -1))
        finally:
            for handle in handles:
                handle.remove()
        return seeded_dropout(torch.cat(parts), self.pass_p_, generator)

    @hookimpl
    def wrapcal_head_members(
        self, wrapped: Any, features: torch.Tensor, from_inputs: bool
    ) -> torch.Tensor:
        """``[T * M, N, K]``: the inner members of ``T`` dropout samples of the features."""
        # With scope="all", features computed from inputs were sampled in
        # wrapcal_features already: the head must not sample them again.
        sampled = self.scope == "all" and from_inputs

        def inner(f: torch.Tensor) -> torch.Tensor:
            return wrapped.call_inner(
                "wrapcal_head_members", self, wrapped=wrapped, features=f, from_inputs=from_inputs
            )

        if sampled or (self.scope == "all" and self.p_ == 0):
            return inner(features)
        total = self.samples
        if self.p_ == 0:
            # No dropout: T identical samples, computed once.
            return inner(features).repeat(total, 1, 1)
        rows, width = features.shape
        masks = self.feature_masks(width, features.device, features.dtype)
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // (total * width))
        parts = []
        for start in range(0, rows, chunk):
            f = features[start : start + chunk]
            n = f.shape[0]
            # [T, n, D] -> [T * n, D]: every sample's head in one batched call.
            members = inner((f.unsqueeze(0) * masks.unsqueeze(1)).reshape(total * n, width))
            m = members.shape[0]
            # [M, T * n, K] -> [T * M, n, K]: inner members vary fastest.
            parts.append(members.reshape(m, total, n, -1).transpose(0, 1).reshape(total * m, n, -1))
        return torch.cat(parts, dim=1)

    @hookimpl
    def wrapcal_scores(
        self, wrapped: Any, members: torch.Tensor, probs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Entropy decomposition and vote statistics over the members."""
        return mc_scores(members, probs.argmax(dim=-1))


def mc_scores(members: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Uncertainty scores ``[B]`` from member logits ``[M, B, K]``.

    Args:
        members: Logits of the ``M`` sampled members.
        label: The final predicted class of each input (for ``std_top_prob``).
    """
    member_probs = logits_to_probs(members)
    m, batch, classes = member_probs.shape
    predictive = entropy(member_probs.mean(dim=0))
    expected = entropy(member_probs).mean(dim=0)
    votes = member_probs.argmax(dim=-1).T  # [B, M]
    counts = torch.zeros(batch, classes, device=votes.device, dtype=member_probs.dtype)
    counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=member_probs.dtype))
    top = member_probs.gather(-1, label.view(1, batch, 1).expand(m, batch, 1)).squeeze(-1)
    return {
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        # Jensen: >= 0; the clamp only removes rounding below zero.
        "mutual_information": (predictive - expected).clamp_min(0),
        "variation_ratio": 1 - counts.max(dim=-1).values / m,
        "std_top_prob": top.std(dim=0, correction=0),
    }


def finetune_head(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    p: float,
    epochs: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> None:
    """Train ``head`` in place with dropout ``p`` on its input, cross-entropy, Adam.

    Starts from the head's current weights. Mini-batches, their order and the masks come
    from a generator seeded with ``seed``.
    """
    device = features.device
    generator = torch.Generator(device=device).manual_seed(seed)
    params = list(head.parameters())
    flags = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    n = features.shape[0]
    try:
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc="mc_dropout finetune", disable=not progress):
                order = torch.randperm(n, generator=generator, device=device)
                for start in range(0, n, _FINETUNE_BATCH):
                    idx = order[start : start + _FINETUNE_BATCH]
                    logits = head(seeded_dropout(features[idx], p, generator))
                    loss = F.nll_loss(logits_to_log_probs(logits), labels[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        for q, flag in zip(params, flags, strict=True):
            q.requires_grad_(flag)


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register("mc_dropout", MCDropout)
