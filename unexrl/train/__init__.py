"""Training entry points: the loop (`train(config)`), distribution, checkpoints and export."""
