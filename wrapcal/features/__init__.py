"""One backbone pass: feature sets, the pass itself, memory and disk stores, fingerprints.

``extract`` runs the backbone once over a data set; ``memory_store`` and ``disk_store``
keep what it produced, keyed by ``fingerprint`` (the backbone's code, weights and
buffers, and the data); ``disk_arrays`` holds features larger than memory, written
and read by row ranges.

This file imports nothing, and should stay so: importing any ``wrapcal.features.X`` runs
it first, so what it imported would run before every module of the package, whichever a
program imports first, and could meet a module half-built (``tests/sdk/test_contract.py``
imports every module first, in a fresh process).
"""
