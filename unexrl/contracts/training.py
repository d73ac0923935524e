"""What a finished training run reports (``curve.json``): written last, so its presence marks a finished run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from unexrl.contracts.base import Contract


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
    curve: list[dict[str, Any]]
    """one point per validation: updates, validation watch time, losses, critic diagnostics"""
