"""MeanFlow training: the step, the loop, evaluation during training, and run-time services."""
