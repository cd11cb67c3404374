"""What a model's inputs are: the preprocessing that travels with a wrapped model.

A classifier takes images that were scaled to a value range, reordered to its channel
order and normalised with a per-channel mean and standard deviation, at one size. Serving
code must do exactly that; :class:`Preprocess` records it so that it is saved with the
model (the ``.wrapcal`` file's ``"preprocess"``), written to an export's metadata
(``"preprocessing"``) and, with ``wrapcal.export(..., include_preprocessing=True)``, built
into the exported graph, which then takes ``uint8`` images ``[N, H, W, C]``.

The mapping of one ``uint8`` pixel ``u`` of channel ``c`` (after reordering the RGB input
to ``channel_order``)::

    x = u / 255                                   # [0, 1]
    x = x * (high - low) + low                    # value_range = (low, high); (0, 1): unchanged
    x = (x - mean[c]) / std[c]

Where it comes from (:func:`resolve`): what the user gives to ``wrapcal.wrap(...,
preprocess=...)`` (a :class:`Preprocess`, a dict of its fields, or a Hugging Face image
processor or its ``preprocessor_config.json`` dict), else what the model says: a timm
model's data config (``timm.data.resolve_data_config``), or a ``wrapcal_preprocess``
dict attribute (the models of :mod:`wrapcal.files.cifar_resnets` carry one). A saved
file is untrusted input: :meth:`Preprocess.from_config` accepts only the known keys,
finite numbers of bounded count and names from fixed lists; nothing in it chooses code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "CHANNEL_ORDERS",
    "INTERPOLATIONS",
    "Preprocess",
    "check_against",
    "fit_to_model",
    "resolve",
]

#: The channel orders a model may take; the exported ``uint8`` graph takes RGB (or L).
CHANNEL_ORDERS = ("RGB", "BGR", "L")
#: Resampling filters a serving pipeline may be told to use (documentation only: the
#: exported graph never resizes).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
#: The largest image side a preprocessing record may name.
MAX_SIDE = 1 << 15
#: The largest absolute value of a mean, std or range bound.
MAX_VALUE = 1e6
#: PIL's resampling codes, as Hugging Face image processors store them.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_FIELDS = ("mean", "std", "size", "channel_order", "value_range", "interpolation")


def _numbers(name: str, value: Any, count: int | None) -> tuple[float, ...]:
    """``value`` as a tuple of finite floats (one number stands for ``count`` of them)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * (count or 1)
    if not isinstance(value, (list, tuple)) or not value or len(value) > 4:
        raise ValueError(
            f"preprocess {name} must be 1 to 4 numbers (one per channel), got {value!r:.80}"
        )
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"preprocess {name} must hold numbers, got {v!r:.40}")
        if not math.isfinite(v) or abs(v) > MAX_VALUE:
            raise ValueError(f"preprocess {name} must hold finite numbers, got {v!r}")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class Preprocess:
    """How images become what a model takes (module docstring for the formula).

    Args:
        mean: Per-channel mean, in the model's channel order, on the scale of
            ``value_range`` (``(0.485, 0.456, 0.406)`` for ImageNet models in [0, 1]).
            One number stands for every channel.
        std: Per-channel standard deviation (positive), as ``mean``.
        size: ``(height, width)`` of the model's input, or ``None`` when any size works
            (then an export takes the size it is traced at). One int means a square.
        channel_order: ``"RGB"``, ``"BGR"`` (OpenCV-trained models) or ``"L"`` (grey).
        value_range: ``(low, high)``: the values that pixel 0 and pixel 255 become before
            normalisation (``(0, 1)``: ``/255``; ``(0, 255)``: raw values; ``(-1, 1)``).
        interpolation: The resampling filter the model was trained with, for serving
            code that resizes (``"bilinear"``, ``"bicubic"``...); ``None`` when unknown.

    Raises:
        ValueError: A value that is not one of these (the message names it).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int] | None = None
    channel_order: str = "RGB"
    value_range: tuple[float, float] = (0.0, 1.0)
    interpolation: str | None = field(default=None)

    def __post_init__(self) -> None:
        order = self.channel_order
        if order not in CHANNEL_ORDERS:
            raise ValueError(
                f"preprocess channel_order must be one of {', '.join(CHANNEL_ORDERS)}, "
                f"got {order!r:.40}"
            )
        channels = len(order)
        mean = _numbers("mean", self.mean, channels)
        std = _numbers("std", self.std, channels)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) == 1 and channels > 1:
                values = values * channels
            if len(values) != channels:
                raise ValueError(
                    f"preprocess {name} has {len(values)} values; channel_order {order!r} "
                    f"has {channels} channels: give one value per channel"
                )
            object.__setattr__(self, name, values)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocess std values must be positive, got {list(self.std)}")
        size = self.size
        if size is not None:
            if isinstance(size, int) and not isinstance(size, bool):
                size = (size, size)
            if not (
                isinstance(size, (list, tuple))
                and len(size) == 2
                and all(
                    isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SIDE
                    for s in size
                )
            ):
                raise ValueError(
                    f"preprocess size must be (height, width), positive ints up to {MAX_SIDE}, "
                    f"or None; got {self.size!r:.80}"
                )
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        low_high = _numbers("value_range", self.value_range, None)
        if len(low_high) != 2 or not low_high[0] < low_high[1]:
            raise ValueError(
                "preprocess value_range must be (low, high) with low < high (what pixels 0 "
                f"and 255 become), got {list(low_high)}"
            )
        object.__setattr__(self, "value_range", low_high)
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess interpolation must be one of {', '.join(INTERPOLATIONS)} or None, "
                f"got {self.interpolation!r:.40}"
            )

    @property
    def channels(self) -> int:
        """Number of channels the model takes."""
        return len(self.channel_order)

    def to_config(self) -> dict[str, Any]:
        """The record as plain JSON (the saved file's and the export's form)."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "size": None if self.size is None else list(self.size),
            "channel_order": self.channel_order,
            "value_range": list(self.value_range),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_config(cls, config: Any) -> Preprocess:
        """Read a record from plain JSON (a saved file): known keys only, checked.

        Raises:
            ValueError: Not an object of these keys, or a value :class:`Preprocess` refuses.
        """
        if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
            raise ValueError("preprocess must be an object of mean, std, size, ...")
        unknown = sorted(set(config) - set(_FIELDS))
        if unknown:
            raise ValueError(
                f"preprocess has unknown keys {unknown[:3]}; its keys are {', '.join(_FIELDS)}"
            )
        if "mean" not in config or "std" not in config:
            raise ValueError("preprocess needs mean and std")
        kwargs = dict(config)
        for key in ("mean", "std", "value_range"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        if isinstance(kwargs.get("size"), list):
            kwargs["size"] = tuple(kwargs["size"])
        if not isinstance(kwargs.get("channel_order", "RGB"), str):
            raise ValueError("preprocess channel_order must be a string")
        if not isinstance(kwargs.get("interpolation") or "", str):
            raise ValueError("preprocess interpolation must be a string or null")
        return cls(**kwargs)

    @classmethod
    def from_image_processor(cls, processor: Any) -> Preprocess:
        """From a Hugging Face image processor (or its ``to_dict()`` /
        ``preprocessor_config.json`` dict): ``image_mean``, ``image_std``,
        ``do_rescale`` / ``rescale_factor``, ``do_normalize``, the crop or resize size.

        Raises:
            ValueError: No ``image_mean`` / ``image_std``, or values :class:`Preprocess`
                refuses.
        """
        if not isinstance(processor, Mapping) and callable(getattr(processor, "to_dict", None)):
            processor = processor.to_dict()  # plain values (sizes as dicts)
        get = (
            processor.get
            if isinstance(processor, Mapping)
            else (lambda key, default=None: getattr(processor, key, default))
        )
        mean, std = get("image_mean"), get("image_std")
        if mean is None or std is None:
            raise ValueError("the image processor has no image_mean / image_std")
        if get("do_normalize", True) is False:
            mean, std = [0.0] * len(mean), [1.0] * len(std)
        high = 255.0
        if get("do_rescale", True) is not False:
            factor = get("rescale_factor", 1 / 255)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)):
                raise ValueError(f"the image processor's rescale_factor is {factor!r:.40}")
            high = round(255.0 * factor, 9)  # 1/255 stored as a decimal: 255 x it is 1
        offset = get("do_rescale", True) is not False and bool(get("rescale_offset", False))
        low = -1.0 if offset else 0.0  # rescale_offset: [-1, 1] (EfficientNet)
        high = high - 1.0 if offset else high
        size = None
        for key, use in (("crop_size", get("do_center_crop", False)), ("size", True)):
            value = get(key)
            if use and isinstance(value, Mapping) and {"height", "width"} <= set(value):
                size = (value["height"], value["width"])
                break
            if use and isinstance(value, Mapping) and key == "crop_size" and value:
                break  # a crop described otherwise: the size is the model's
        resample = get("resample")
        interpolation = _PIL_RESAMPLE.get(resample) if isinstance(resample, int) else None
        return cls(
            mean=tuple(mean),
            std=tuple(std),
            size=size,
            value_range=(low, high),
            interpolation=interpolation,
        )

    @classmethod
    def from_model(cls, model: Any) -> Preprocess | None:
        """What the model says about its inputs, or ``None``: a timm model's data config,
        else a ``wrapcal_preprocess`` dict attribute (any module may carry one)."""
        own = getattr(model, "wrapcal_preprocess", None)
        if isinstance(own, Mapping):
            return cls.from_config(own)
        if type(model).__module__.startswith("timm.") and getattr(model, "pretrained_cfg", None):
            return _from_timm(model)
        return None


def _from_timm(model: Any) -> Preprocess | None:
    """timm's resolved data config (mean, std, input size, interpolation)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    mean, std, shape = config.get("mean"), config.get("std"), config.get("input_size")
    if mean is None or std is None:
        return None
    order = {1: "L", 3: "RGB"}.get(len(mean))
    if order is None:
        return None
    size = tuple(shape[1:]) if isinstance(shape, (tuple, list)) and len(shape) == 3 else None
    interpolation = config.get("interpolation")
    return Preprocess(
        mean=tuple(mean),
        std=tuple(std),
        size=size,
        channel_order=order,
        interpolation=interpolation if interpolation in INTERPOLATIONS else None,
    )


def resolve(given: Any, model: Any) -> Preprocess | None:
    """The record for ``wrap(model, preprocess=given)``: the user's, else the model's.

    Args:
        given: ``None``, a :class:`Preprocess`, a dict of its fields, or a Hugging Face
            image processor (an object or dict with ``image_mean``).
        model: The model, before it is split.

    Raises:
        TypeError: ``given`` is none of those.
        ValueError: Values :class:`Preprocess` refuses.
    """
    if given is None:
        return Preprocess.from_model(model)
    if isinstance(given, Preprocess):
        return given
    if isinstance(given, Mapping):
        if "image_mean" in given:
            return Preprocess.from_image_processor(given)
        return Preprocess.from_config(given)
    if hasattr(given, "image_mean"):
        return Preprocess.from_image_processor(given)
    raise TypeError(
        "preprocess must be a wrapcal.Preprocess(mean=..., std=..., size=...), a dict of "
        f"its fields or a Hugging Face image processor; got {type(given).__name__}"
    )


def check_against(
    preprocess: Preprocess | None, input_shape: Sequence[int] | None, fixed: bool = False
) -> None:
    """Refuse a record that contradicts the input shape the model knows.

    Raises:
        ValueError: Another number of channels, or another size for a model that takes
            only one (``fixed``).
    """
    if preprocess is None or not input_shape:
        return
    if input_shape[0] != preprocess.channels:
        raise ValueError(
            f"preprocess describes {preprocess.channels} channel(s) "
            f"({preprocess.channel_order}); the model takes {input_shape[0]}: give one mean "
            "and std per channel the model takes"
        )
    size = tuple(input_shape[1:])
    if fixed and preprocess.size is not None and len(size) == 2 and preprocess.size != size:
        raise ValueError(
            f"preprocess size is {list(preprocess.size)}; the model takes only {list(size)}: "
            f"give size={size}"
        )


def fit_to_model(
    preprocess: Preprocess, input_shape: Sequence[int] | None, fixed: bool
) -> Preprocess | None:
    """A record the model stated, made to agree with the input shape its split knows: a
    model built at another size than its default config's takes that size; another
    number of channels than its config's mean has makes the record unknown (``None``)."""
    if not input_shape:
        return preprocess
    if input_shape[0] != preprocess.channels:
        return None
    size = tuple(int(s) for s in input_shape[1:])
    if fixed and len(size) == 2 and preprocess.size != size:
        return replace(preprocess, size=size)
    return preprocess
