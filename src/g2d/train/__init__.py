"""Training application: distributed set-up, data loading, the pre-training loop."""
