"""UNEX-RL: multi-agent reinforcement learning for multi-stage recommender cascades."""

__version__ = "0.1.0"
