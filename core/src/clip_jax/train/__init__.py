"""Training: sharded state, the jit train step, checkpoints, progress, the loop."""
