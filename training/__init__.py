"""Training: Lightning modules, data, callbacks and the `quietdepth` CLI."""
