"""Training: the step (losses over a batch), the loop (accelerate), checkpoints and logs."""
