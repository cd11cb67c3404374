"""Integrations with the frameworks users train in, each an extra imported only when used.

* :mod:`wrapcal.integrations.lightning`: ``WrapcalCallback``, a Lightning callback that
  wraps, fits, reports and saves the trained module when ``trainer.fit`` ends
  (``pip install 'wrapcal[lightning]'``).

Nothing is imported here: ``import wrapcal`` (and ``import wrapcal.integrations``) never
imports a framework.
"""
