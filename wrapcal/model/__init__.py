"""The wrapped model: plugins found by name, ordered, attached and fitted, then run.

``discovery`` finds plugins (entry points, built-ins first); ``split`` cuts a model into
backbone and head; ``ordering`` and ``assemble`` build the :class:`WrappedModel`
(``wrapped``); ``chain`` runs the plugins in stage order; ``fitting`` is the fit loop over
one backbone pass; ``operating_points`` are the thresholds measured at fit time.
"""
