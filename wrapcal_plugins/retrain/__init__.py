"""Retrainers: plugins that change the model's own head or network (label smoothing)."""
