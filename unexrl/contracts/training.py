"""What a training run writes for others to read: ``curve.json`` (written last, so its presence marks a finished
run), and each checkpoint's hash manifest and progress."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from unexrl.contracts.base import SHA256, Contract, Part
from unexrl.contracts.diagnostics import CriticDiagnostics


class ValidationScore(Part):
    """A policy's score at one point of its training: what learning curves plot."""

    updates: int = Field(ge=0)
    validation_watch_time: float
    """mean session watch time (s) of the greedy actors on ``train.eval_sessions`` of the first validation seed"""


class CurvePoint(ValidationScore):
    """One validation point of a training run: the current actors' score and the update that preceded it."""

    critic_loss: float
    q: float
    """mean Q_1 of the logged actions in the last update's batch"""
    target: float
    """mean TD target y of that batch"""
    actor_loss: float | None = None
    """None when the last update took no actor step (``algo.policy_delay``, ``algo.actor_start``)"""
    diagnostics: CriticDiagnostics | None = None
    """the critic against the simulator's truth (``diagnostics.during_training``)"""


class TrainingSummary(Contract):
    """A training run's outcome, timings and validation curve (unexrl/train/job.py)."""

    algorithm: str
    regime: Literal["online", "offline"]
    updates: int = Field(ge=0)
    resumed_from: int | None
    """the checkpoint's update count when the run was resumed"""
    world_size: int = Field(ge=1)
    seconds: float = Field(ge=0)
    updates_per_s: float | None
    """inside the update step"""
    run_updates_per_s: float | None
    """over the whole run"""
    seconds_by_part: dict[str, float]
    """update, collect, sample, validate, diagnose, checkpoint"""
    seconds_per_update_outside_update: float | None
    final_validation_watch_time: float | None
    selected_updates: int | None
    """the validation point whose actors were exported (``train.select``)"""
    curve: list[CurvePoint]


class TrainingProgress(Contract):
    """A checkpoint's ``progress.json``: what a resumed run needs besides tensors."""

    updates: int = Field(ge=0)
    next_session: int = Field(ge=0)
    """this rank's next local session index (session ids are index * world_size + rank)"""
    curve: list[CurvePoint]
    """validation points so far (rank 0's)"""
    world_size: int = Field(ge=1)
    best_updates: int | None = None
    """the update count of the best validation point so far (its actors: the checkpoint's best-actors file)"""
    best_score: float | None = None


class CheckpointManifest(Contract):
    """Every file of one checkpoint and its sha256, written when the checkpoint is complete and verified before
    DCP reads anything: DCP's ``.metadata`` is a pickle, so an unverified checkpoint could run code in training."""

    updates: int = Field(ge=0)
    files: dict[str, str] = Field(min_length=1)
    """file name (no directories: a checkpoint is flat) -> sha256"""

    @field_validator("files")
    @classmethod
    def _flat_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if "/" in name or "\\" in name or name in ("", ".", "..") or not re.fullmatch(SHA256, digest):
                raise ValueError(f"{name!r}: {digest!r} is not a file name and a sha256")
        return value
