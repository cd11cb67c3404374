"""The base class of wrapcal plugins: scikit-learn habits on an ``nn.Module``."""

from __future__ import annotations

import inspect
from enum import IntEnum
from typing import Any, ClassVar

from torch import nn

from wrapcal.errors import NotFittedError


class Stage(IntEnum):
    """When a plugin acts. The same plugins in any list order give the same model."""

    TRAIN = 10  #: retrains the head or the network (label smoothing)
    HEADS = 20  #: builds extra heads on the (retrained) head (discrepancy)
    SAMPLE = 30  #: samples at inference (MC dropout)
    CALIBRATE = 40  #: post-hoc calibration of the final output (temperature)


class Plugin(nn.Module):
    """Base class for plugins. Subclasses implement hooks from :mod:`wrapcal.hookspecs`.

    Following scikit-learn, ``__init__`` only stores its parameters (under the same
    names), learned state ends in ``_``, and a plugin that needs data before it can be
    used says so through ``requires_fit``. Tensors a plugin learns belong in buffers or
    parameters, so they travel with the wrapped model's ``state_dict``; plain values
    go in :meth:`get_state`.

    Attributes:
        stage: When the plugin acts (:class:`Stage`).
        requires_fit: Whether ``wrapped.fit`` must run before the plugin is used.
        changes_backbone: Whether ``fit`` changes the backbone, so the core must
            recompute the cached features afterwards.
    """

    stage: ClassVar[Stage] = Stage.CALIBRATE
    requires_fit: ClassVar[bool] = True
    changes_backbone: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.fitted_ = False

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [
            name
            for name, p in signature.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters, as stored on the instance (JSON-able)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def get_state(self) -> dict[str, Any]:
        """Learned plain values (JSON-able) to save beside the tensors."""
        return {"fitted": bool(self.fitted_)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""
        self.fitted_ = bool(state.get("fitted", False))

    def check_is_fitted(self) -> None:
        """Raise :class:`NotFittedError` if the plugin needs a ``fit`` it has not had."""
        if self.requires_fit and not self.fitted_:
            raise NotFittedError(
                f"plugin {type(self).__name__} is not fitted: call "
                "wrapped.fit(...) with the data it needs before predicting"
            )

    def __getattr__(self, name: str) -> Any:
        # A property that raises NotFittedError (an AttributeError, like scikit-learn's)
        # makes Python retry through __getattr__, where nn.Module would replace the
        # message with "no attribute": call the property again to raise its own error.
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property) and attribute.fget is not None:
            return attribute.fget(self)
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
