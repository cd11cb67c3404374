"""Exceptions raised by wrapcal. Each message names the problem and the fix."""

from __future__ import annotations


class WrapcalError(Exception):
    """Base class of wrapcal's own errors."""


class NotFittedError(WrapcalError, ValueError, AttributeError):
    """A plugin or model was used before the ``fit`` call it needs.

    Subclasses ``ValueError`` and ``AttributeError`` like scikit-learn's.
    """


class SplitError(WrapcalError, ValueError):
    """A model could not be split into features and head."""


class PluginNotFoundError(WrapcalError, LookupError):
    """No installed plugin has the requested name."""


class PluginNameClashError(PluginNotFoundError):
    """Several installed packages register the requested plain name: pick one with its
    qualified name ``"package:name"`` (the message lists them)."""


class SavedFileError(WrapcalError, ValueError):
    """A saved wrapcal file is missing, truncated, corrupt or does not match the model."""


class DataError(WrapcalError, ValueError):
    """Input data has the wrong type, shape, dtype or values."""


class DistributedError(WrapcalError, RuntimeError):
    """Under ``torch.distributed``: another rank failed (the message says which and why),
    or a plugin holds only this rank's part of its state where the whole is needed."""
