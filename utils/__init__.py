"""Infrastructure: distributed set-up, data, checkpoints, FID."""
