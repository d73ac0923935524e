"""KFP v2 components of the continuous-training pipeline: one per step, each a typed signature and one call into
unexrl.pipeline (the logic lives there). Images per role are in components/images.py."""

from components.data import (
    build_features,
    build_training_set,
    ingest_logs,
    materialize_features,
    simulate_logs,
)
from components.release import deploy, evaluate, gate, package, resolve_incumbent
from components.training import train

__all__ = [
    "build_features",
    "build_training_set",
    "deploy",
    "evaluate",
    "gate",
    "ingest_logs",
    "materialize_features",
    "package",
    "resolve_incumbent",
    "simulate_logs",
    "train",
]
