"""Out-of-distribution detectors: feature-space (KNN, Mahalanobis, ViM, ReAct) and the
dual-head discrepancy detector of Yu & Aizawa (2019)."""
