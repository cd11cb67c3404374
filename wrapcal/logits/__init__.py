"""Tools for logits you already have, no model needed.

``temperature`` (:func:`~wrapcal.fit_temperature`), ``calibrators``
(:func:`~wrapcal.fit_calibrator`), ``conformal`` (:func:`~wrapcal.conformal_sets`,
:func:`~wrapcal.fit_conformal`) and ``abstention`` (:func:`~wrapcal.fit_abstention`).
"""
