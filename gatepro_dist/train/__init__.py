"""The training engine: model, data, loop, gradients and optimizer, checkpoints, metrics and report."""
