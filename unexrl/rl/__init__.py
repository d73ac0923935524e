"""Reinforcement learning for the cascade: CQR reward rescaling, CIC replay, critics, actors, updates."""
