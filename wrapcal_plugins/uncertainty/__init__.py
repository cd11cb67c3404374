"""Model-uncertainty plugins: ensembles of checkpoints, last-layer Laplace."""

from wrapcal_plugins.uncertainty.ensemble import Ensemble

__all__ = ["Ensemble"]
