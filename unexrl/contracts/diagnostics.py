"""What the critic diagnostics measure (unexrl/rl/diagnostics.py computes them): printed by `unexrl diagnose`,
written into curve.json at every validation point and into an experiment's results.json. docs/training.md says how
to read them."""

from __future__ import annotations

import math

from pydantic import Field

from unexrl.contracts.base import Part


class PerGroup(Part):
    per_group: list[float]
    """one value per activity group"""
    mean: float
    """mean over the groups that have a value (NaN in ``per_group``: a group with no transitions to score)"""

    @staticmethod
    def of(values: list[float]) -> PerGroup:
        scored = [v for v in values if not math.isnan(v)]
        return PerGroup(per_group=values, mean=sum(scored) / len(scored) if scored else math.nan)


class GroupCalibration(Part):
    group: int
    transitions: int
    mean_q: float
    mean_return: float
    relative_bias: float
    """(mean Q - mean G) / |mean G|"""
    correlation: float


class Calibration(Part):
    transitions: int
    mean_q: float
    mean_return: float
    relative_bias: float
    """(mean Q_1 - mean G) / |mean G| over all transitions"""
    correlation: float
    """Pearson correlation of Q_1 and G over all transitions"""
    per_group: list[GroupCalibration]


class GradientCheck(Part):
    cosine: PerGroup
    """cosine of the mean critic gradient and the true watch-time gradient, per activity group"""
    sign_agreement: PerGroup
    """fraction of weights whose gradient sign the critic gets right, per activity group"""
    stage_cosine: list[list[float]]
    """[group][stage] cosine on each stage's weights"""
    stage_sign_agreement: list[list[float]] = Field(default_factory=list)
    """[group][stage] sign agreement on each stage's weights (empty in records written before it was kept)"""
    critic: list[list[float]]
    """[group][weight] mean dQ/da (NaN where no critic reads that stage's action: independent DDPG)"""
    truth: list[list[float]]
    """[group][weight] true gradient, seconds of session watch time per unit weight"""
    truth_split_half_cosine: list[float]
    """[group] cosine of the truth estimated on each half of the sessions: how repeatable the truth is"""
    cosine_training_return: PerGroup
    """cosine of the critic's gradient and the true gradient of its own target, the discounted training return
    (equal to ``cosine`` when that return is undiscounted watch time): low here means the critic is wrong; high
    here but low in ``cosine`` means the reward misleads (see ``reward_alignment``)"""
    sessions: int
    """sessions per finite-difference rollout"""
    delta: float


class CriticDiagnostics(Part):
    """What `unexrl diagnose` prints and curve.json / results.json record (keys: ``calibration.relative_bias``,
    ``calibration.correlation``, ``gradient.cosine``, ``gradient.sign_agreement``, ``reward_alignment``)."""

    seed: int
    """the validation seed the diagnostics ran on"""
    updates: int
    calibration: Calibration
    gradient: GradientCheck
    reward_alignment: PerGroup
    """cosine of the true gradient of the discounted training return with the true watch-time gradient"""
    seconds: float
