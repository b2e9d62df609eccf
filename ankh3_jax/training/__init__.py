"""Pre-training loop: state, losses, optimizers, steps, data feeding, checkpoints."""
