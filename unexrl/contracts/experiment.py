"""What one run of `unexrl experiment` leaves on disk for the summary and for a resumed experiment: a record beside
the ``.npz`` of its per-session outcomes, written after it, so that its presence marks a complete run."""

from __future__ import annotations

from pydantic import Field

from unexrl.contracts.base import Contract
from unexrl.contracts.diagnostics import CriticDiagnostics
from unexrl.contracts.training import ValidationScore


class RunRecord(Contract):
    """One trained (or tuned) policy of the experiment and how it was scored (unexrl/experiment.py)."""

    variant: str
    seed: int = Field(ge=0)
    """the training seed k (seeds.train shifted by 100 k)"""
    agents: int | None
    """the agents-count study's number of learning stages; None in the main table"""
    curve: list[ValidationScore]
    """the learner's validation points; a baseline's one point at 0 updates (its plot's reference line)"""
    seconds: float = Field(ge=0)
    eval_seeds: int = Field(ge=1)
    """how many evaluation seeds the ``.npz`` holds outcomes for"""
    group_actions: list[list[float]]
    """[activity group][weight] mean action on the first evaluation seed's requests"""
    diagnostics: CriticDiagnostics | None
    """the final critic against the simulator's truth (learners of the main table only)"""
