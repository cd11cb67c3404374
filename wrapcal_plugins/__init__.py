"""wrapcal's built-in plugins, by family, each registered through the ``wrapcal``
entry-point group like a third-party package's.

``calibration/`` (temperature, scaling, ensemble temperature, binning, auto), ``ood/``
(knn, mahalanobis, vim, react, discrepancy), ``retrain/`` (label smoothing),
``sampling/`` (MC dropout), ``decide/`` (conformal sets, abstention) and ``adapters/``
(Hugging Face transformers). They import only ``wrapcal`` and ``wrapcal.plugin``.
"""

# 0.2.0's flat paths (wrapcal_plugins.knn) resolve through wrapcal's finder of moved modules.
import wrapcal  # noqa: F401
