"""One backbone pass: feature sets, the pass itself, memory and disk stores, fingerprints.

``extract`` runs the backbone once over a data set; ``memory_store`` and ``disk_store``
keep what it produced, keyed by ``fingerprint`` (the backbone's weights and the data);
``disk_arrays`` holds features larger than memory, written and read by row ranges.
"""
