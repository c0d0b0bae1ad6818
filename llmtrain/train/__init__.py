"""Training: the loop, optimizer and schedules, checkpoints, metrics."""
