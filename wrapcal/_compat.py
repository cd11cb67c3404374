"""Import paths of wrapcal 0.2.0, kept working for this release with a DeprecationWarning.

wrapcal 0.3 moved its 31 flat modules into folders (``plugin/``, ``features/``, ``model/``,
``files/``, ``logits/``) and the built-in plugins into families (``wrapcal_plugins.ood``...).
Packages written against the old paths (``from wrapcal.params import Interval``) keep
working: importing an old path warns once, naming the new one, and gives the very module
(or, where one old module became two, a view of both), so classes keep their identity.
Plugin authors import from :mod:`wrapcal.plugin` instead.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "MOVED_NAMES", "PUBLIC_ALIASES", "install"]

#: Old dotted path -> the modules that now hold its names, first match wins.
MOVED: dict[str, tuple[str, ...]] = {
    "wrapcal.assemble": ("wrapcal.model.assemble",),
    "wrapcal.cache": ("wrapcal.features.extract",),
    "wrapcal.calibrate": ("wrapcal.logits.temperature",),
    "wrapcal.calibrator": ("wrapcal.plugin.calibrator", "wrapcal.logits.calibrators"),
    "wrapcal.chain": ("wrapcal.model.chain",),
    "wrapcal.demo": ("wrapcal.cli.demo",),
    "wrapcal.disk_cache": ("wrapcal.features.disk_store",),
    "wrapcal.disk_features": ("wrapcal.features.disk_arrays",),
    "wrapcal.feature_cache": ("wrapcal.features.memory_store",),
    "wrapcal.fingerprint": ("wrapcal.features.fingerprint",),
    "wrapcal.fitting": ("wrapcal.model.fitting",),
    "wrapcal.hookspecs": ("wrapcal.plugin.hookspecs",),
    "wrapcal.loading": ("wrapcal.files.load",),
    "wrapcal.manager": ("wrapcal.model.discovery",),
    "wrapcal.models": ("wrapcal.files.cifar_resnets",),
    "wrapcal.operating_points": ("wrapcal.model.operating_points",),
    "wrapcal.ordering": ("wrapcal.model.ordering",),
    "wrapcal.params": ("wrapcal.plugin.constraints",),
    "wrapcal.prediction": ("wrapcal.plugin.prediction",),
    "wrapcal.probs": ("wrapcal.plugin.probs",),
    "wrapcal.registry": ("wrapcal.files.families",),
    "wrapcal.saving": ("wrapcal.files.format",),
    "wrapcal.split": ("wrapcal.model.split",),
    "wrapcal.torch_utils": ("wrapcal.plugin.torch_helpers",),
    "wrapcal.types": ("wrapcal.plugin.types",),
    "wrapcal.wrapped": ("wrapcal.model.wrapped",),
    "wrapcal_plugins._discrepancy_training": ("wrapcal_plugins.ood._discrepancy_training",),
    "wrapcal_plugins._dropout": ("wrapcal_plugins.sampling._dropout",),
    "wrapcal_plugins._feature_stats": ("wrapcal_plugins.ood._feature_stats",),
    "wrapcal_plugins._hf_config": ("wrapcal_plugins.adapters._hf_config",),
    "wrapcal_plugins._linear_calibration": ("wrapcal_plugins.calibration._linear_calibration",),
    "wrapcal_plugins._maps": ("wrapcal_plugins.calibration._maps",),
    "wrapcal_plugins._smoothing_network": ("wrapcal_plugins.retrain._smoothing_network",),
    "wrapcal_plugins._training": ("wrapcal.plugin.training",),
    "wrapcal_plugins.abstain": ("wrapcal_plugins.decide.abstain",),
    "wrapcal_plugins.auto_calibration": ("wrapcal_plugins.calibration.auto_calibration",),
    "wrapcal_plugins.binning": ("wrapcal_plugins.calibration.binning",),
    "wrapcal_plugins.conformal": ("wrapcal_plugins.decide.conformal",),
    "wrapcal_plugins.discrepancy": ("wrapcal_plugins.ood.discrepancy",),
    "wrapcal_plugins.ensemble_temperature": ("wrapcal_plugins.calibration.ensemble_temperature",),
    "wrapcal_plugins.hf_transformers": ("wrapcal_plugins.adapters.hf_transformers",),
    "wrapcal_plugins.knn": ("wrapcal_plugins.ood.knn",),
    "wrapcal_plugins.label_smoothing": ("wrapcal_plugins.retrain.label_smoothing",),
    "wrapcal_plugins.mahalanobis": ("wrapcal_plugins.ood.mahalanobis",),
    "wrapcal_plugins.mc_dropout": ("wrapcal_plugins.sampling.mc_dropout",),
    "wrapcal_plugins.react": ("wrapcal_plugins.ood.react",),
    "wrapcal_plugins.scaling": ("wrapcal_plugins.calibration.scaling",),
    "wrapcal_plugins.temperature": ("wrapcal_plugins.calibration.temperature",),
    "wrapcal_plugins.vim": ("wrapcal_plugins.ood.vim",),
}


#: Names of an old module that its new modules do not hold under that name: old path ->
#: {old name: (the module that holds it now, its name there)}. 0.2.0's conformal plugin
#: module also held the report's bootstrap, which is the SDK's now.
MOVED_NAMES: dict[str, dict[str, tuple[str, str]]] = {
    "wrapcal_plugins.conformal": {
        "bootstrap_means": ("wrapcal.plugin", "bootstrap_means"),
        "interval": ("wrapcal.plugin", "percentile_interval"),
    },
}


class _Merged(types.ModuleType):
    """An old module whose names now live in several modules (or under other names).

    Its ``__all__`` is the union of its modules' and the moved names, so ``from old
    import *`` gives what it gave.
    """

    def __init__(
        self, name: str, targets: tuple[str, ...], moved: dict[str, tuple[str, str]]
    ) -> None:
        super().__init__(name)
        self.__targets = targets
        self.__moved = moved
        public: list[str] = []
        for target in targets:
            for attribute in getattr(importlib.import_module(target), "__all__", ()):
                if attribute not in public:
                    public.append(attribute)
        self.__all__ = [*public, *(n for n in moved if n not in public)]

    def __getattr__(self, attribute: str) -> Any:
        if attribute in self.__moved:
            module, new_name = self.__moved[attribute]
            return getattr(importlib.import_module(module), new_name)
        for target in self.__targets:
            loaded = importlib.import_module(target)
            if hasattr(loaded, attribute):
                return getattr(loaded, attribute)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attribute!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__all__))


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths in :data:`MOVED` and loads them as their new modules."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = MOVED[spec.name]
        renamed = "".join(
            f"; its {old} is {module}.{new}"
            for old, (module, new) in MOVED_NAMES.get(spec.name, {}).items()
            if old != new
        )
        warnings.warn(
            f"{spec.name} moved to {' and '.join(targets)} in wrapcal 0.3{renamed}; the old "
            "path is removed in 0.4 (plugin authors: import from wrapcal.plugin)",
            DeprecationWarning,
            stacklevel=2,
        )
        if len(targets) > 1 or spec.name in MOVED_NAMES:
            return _Merged(spec.name, targets, MOVED_NAMES.get(spec.name, {}))
        module = importlib.import_module(targets[0])
        # The import system stamps the alias's spec on the module it gets: keep the real one.
        self._specs = getattr(self, "_specs", {})
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        spec = module.__spec__
        real = None if spec is None else getattr(self, "_specs", {}).pop(spec.name, None)
        if real is not None:
            module.__spec__ = real


_FINDER = _MovedModuleFinder()


#: Public modules kept under their 0.2.0 names, without a warning: ``wrapcal.conformal``
#: and ``wrapcal.selective`` are documented API, now held in ``wrapcal.logits``.
PUBLIC_ALIASES = {
    "wrapcal.conformal": "wrapcal.logits.conformal",
    "wrapcal.selective": "wrapcal.logits.abstention",
}


def install() -> None:
    """Put the finder of old paths on ``sys.meta_path`` and the public aliases in
    ``sys.modules`` (once)."""
    for alias, target in PUBLIC_ALIASES.items():
        sys.modules.setdefault(alias, importlib.import_module(target))
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
