"""The simulator's long-term structure, measured on the small config with fixed seeds (docs/simulator.md).

Baselines are tuned on seeds.train only; every claim is a paired comparison on seeds.evaluation whose 95%
bootstrap interval must exclude zero. No number here is hard-coded: the assertions are about directions.
"""

from __future__ import annotations

import numpy as np
import pytest

from unexrl.commands import reference_policies
from unexrl.config import Config
from unexrl.evaluate.evaluation import EvaluationReport, evaluate_policies
from unexrl.evaluate.stats import bootstrap_uplift
from unexrl.policies.baselines import tune_baselines
from unexrl.sim.env import Simulator


@pytest.fixture(scope="module")
def report(small_cfg: Config, small_sim: Simulator) -> EvaluationReport:
    policies = {**reference_policies(small_cfg), **tune_baselines(small_sim, progress=False)}
    return evaluate_policies(small_sim, policies, progress=False)


def _uplift(report: EvaluationReport, candidate: str, reference: str) -> tuple[float, float]:
    est = bootstrap_uplift(
        report.results[candidate].by_seed("watch_time"), report.results[reference].by_seed("watch_time")
    )
    return est.low, est.high


def test_greedy_wins_the_item_but_loses_the_session(report: EvaluationReport) -> None:
    """Maximising predicted immediate watch time gets longer views per item and far shorter sessions."""
    per_item = {
        name: float(
            np.sum(report.results[name].by_seed("watch_time")) / np.sum(report.results[name].by_seed("items"))
        )
        for name in ("greedy", "cem")
    }
    assert per_item["greedy"] > per_item["cem"]
    low, _ = _uplift(report, "cem", "greedy")
    assert low > 0, "the quality/diversity-aware CEM weights must beat greedy on session watch time"


def test_upstream_matters(report: EvaluationReport) -> None:
    """A matching stage that passes only popular items caps the cascade, even with the later stages re-tuned."""
    low, _ = _uplift(report, "cem", "popular-matching")
    assert low > 0


def test_per_group_headroom(report: EvaluationReport) -> None:
    """Per-type weights beat global CEM, and controlling every stage beats controlling only the ranking stage."""
    low, _ = _uplift(report, "oracle-group-cem-all", "cem")
    assert low > 0
    low, _ = _uplift(report, "oracle-group-cem-all", "oracle-group-cem-ranking")
    assert low > 0
    low, _ = _uplift(report, "oracle-group-cem-ranking", "cem")
    assert low > 0
