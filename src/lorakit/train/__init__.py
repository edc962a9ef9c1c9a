"""Training: data sets, metrics and the training loop."""
