"""Model-uncertainty plugins: ensembles of checkpoints, last-layer Laplace."""
