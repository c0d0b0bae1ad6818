"""Alternative training engines (DeepSpeed)."""
