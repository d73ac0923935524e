"""The gate's decision on evaluation summaries, without running an evaluation, and the summaries it refuses to
read: impossible or inconsistent ones are an error that names the field."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from unexrl.config import Config
from unexrl.contracts.base import ContractError
from unexrl.contracts.evaluation import EvaluationSummary, GateDecision
from unexrl.pipeline.gate import decide
from unexrl.pipeline.steps import gate


def _estimate(mean: float, low: float, high: float) -> dict[str, float]:
    return {"mean": mean, "low": low, "high": high}


def summary_doc(
    mean: float = 2.0, low: float = 0.5, high: float = 3.5, p99: float = 4.0, nonfinite: int = 0
) -> dict[str, Any]:
    """A summary as evaluate writes it (JSON document)."""
    policy = {
        "watch_time": _estimate(1300.0, 1280.0, 1320.0),
        "items": _estimate(40.0, 39.0, 41.0),
        "requests": _estimate(8.0, 7.9, 8.1),
        "uplift_vs_reference_pct": None,
    }
    return {
        "schema_version": 1,
        "candidate_sha256": "ab" * 32,
        "seeds": [2000, 2001],
        "candidate_seen_seeds": [1000, 1500],
        "sessions_per_seed": 200,
        "incumbent": {"name": "cem", "artifact": "cem", "first_release": True},
        "policies": {
            "candidate": {**policy, "uplift_vs_reference_pct": _estimate(mean, low, high)},
            "cem": policy,
        },
        "uplift_vs_incumbent_pct": _estimate(mean, low, high),
        "uplift_vs_cem_pct": _estimate(mean, low, high),
        "actions": [
            {
                "stage": "ranking",
                "requests": 1600,
                "heads": ["affinity", "quality"],
                "mean": [0.5, 0.4],
                "std": [0.1, 0.0],
                "min": 0.1,
                "max": 0.9,
                "nonfinite": nonfinite,
                "out_of_bounds": 0,
            }
        ],
        "action_bounds": [-1.0, 1.0],
        "latency": {"p50_ms": 2.0, "p99_ms": p99, "probes": 200},
    }


def summary(**changes: Any) -> EvaluationSummary:
    return EvaluationSummary.model_validate_json(json.dumps(summary_doc(**changes)))


def test_passes_only_when_every_check_holds() -> None:
    assert decide(summary(), min_uplift_pct=1.0, latency_budget_ms=10.0).passed
    for changed, reason in (
        (summary(mean=0.5), "uplift >= 1.0%"),
        (summary(low=-0.1), "uplift CI lower bound > 0"),
        (summary(p99=50.0), "latency p99 <= 10.0 ms"),
        (summary(nonfinite=1), "actions finite"),
        (summary(high=math.nan), "metrics finite"),
    ):
        decision = decide(changed, min_uplift_pct=1.0, latency_budget_ms=10.0)
        assert not decision.passed and reason in decision.reasons, decision.reasons


def _broken(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(summary_doc())
    *parents, key = path.split(".")
    target = doc
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (
            "uplift_vs_incumbent_pct.low",
            5.0,
            "uplift_vs_incumbent_pct: Value error, interval low 5.0 exceeds",
        ),
        ("uplift_vs_incumbent_pct.low", None, "uplift_vs_incumbent_pct.low: Input should be a valid number"),
        (
            "uplift_vs_incumbent_pct.mean",
            "2.0",
            "uplift_vs_incumbent_pct.mean: Input should be a valid number",
        ),
        (
            "uplift_vs_incumbent_pct.mean",
            True,
            "uplift_vs_incumbent_pct.mean: Input should be a valid number",
        ),
        ("latency.p99_ms", -1.0, "latency.p99_ms: Input should be greater than or equal to 0"),
        ("latency.p99_ms", 1.0, "latency: Value error, p99 1.0 ms is below p50 2.0 ms"),
        ("actions", [], "actions: List should have at least 1 item"),
        ("actions.0.std", [0.1], "actions.0: Value error, 2 heads but 2 means and 1 stds"),
        ("actions.0.min", 2.0, "actions.0: Value error, min 2.0 exceeds max 0.9"),
        ("actions.0.nonfinite", -1, "actions.0.nonfinite: Input should be greater than or equal to 0"),
        ("action_bounds", [1.0, -1.0], "Value error, action_bounds [1.0, -1.0]: low must be below high"),
        ("seeds", [], "seeds: List should have at least 1 item"),
        ("seeds", [3000, 3000], "seeds: [3000, 3000] names a seed twice"),
        ("candidate_seen_seeds", [1000, 2001], "seeds: [2001] are in candidate_seen_seeds"),
        ("incumbent.name", "greedy", "incumbent.name: Input should be 'incumbent' or 'cem'"),
        ("policies.cem", KeyError, "policies: ['cem'] missing"),
        ("surprise", 1, "surprise: Extra inputs are not permitted"),
        ("schema_version", 2, "schema_version 2: this code reads version 1"),
    ],
)
def test_impossible_summaries_are_refused_naming_the_field(
    tmp_path: Path, path: str, value: Any, named: str
) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(_broken(path, value)))
    with pytest.raises(ContractError, match="not a valid EvaluationSummary") as err:
        gate(
            tmp_path,
            min_uplift_pct=1.0,
            latency_budget_ms=10.0,
            decision_out=tmp_path / "decision",
            report_out=tmp_path / "report.md",
        )
    assert named in str(err.value)
    assert not (tmp_path / "decision").exists()  # nothing decided on a summary that could not be read


@pytest.mark.parametrize(("minimum", "budget"), [(math.nan, 10.0), (1.0, 0.0), (1.0, math.inf), (1.0, -5.0)])
def test_thresholds_out_of_range_are_refused(minimum: float, budget: float) -> None:
    with pytest.raises(ValueError, match="min_uplift_pct|latency_budget_ms"):
        decide(summary(), min_uplift_pct=minimum, latency_budget_ms=budget)


def test_the_decision_round_trips_and_cannot_contradict_its_checks(tmp_path: Path) -> None:
    decision = gate(
        _write(tmp_path, summary_doc(mean=0.5)),
        min_uplift_pct=1.0,
        latency_budget_ms=10.0,
        decision_out=tmp_path / "decision",
        report_out=tmp_path / "report.md",
    )
    assert GateDecision.read(tmp_path / "decision") == decision and not decision.passed
    assert (tmp_path / "report.md").read_text().startswith("# Gate: REFUSE")
    forged = json.loads((tmp_path / "decision").read_text()) | {"passed": True}
    (tmp_path / "decision").write_text(json.dumps(forged))
    with pytest.raises(ContractError, match="passed and reasons disagree with the checks"):
        GateDecision.read(tmp_path / "decision")


def _write(directory: Path, doc: dict[str, Any]) -> Path:
    (directory / "summary.json").write_text(json.dumps(doc))
    return directory


def test_a_metric_that_could_not_be_computed_survives_the_round_trip_and_is_refused(tmp_path: Path) -> None:
    """NaN is written as NaN (not null): the gate reads a summary it can judge, and refuses it."""
    summary(high=math.nan).write(tmp_path / "summary.json")
    decision = gate(
        tmp_path,
        min_uplift_pct=1.0,
        latency_budget_ms=10.0,
        decision_out=tmp_path / "d",
        report_out=tmp_path / "r",
    )
    assert not decision.passed and "metrics finite" in decision.reasons
    assert math.isnan(GateDecision.read(tmp_path / "d").uplift_vs_incumbent_pct.high)


def test_an_evaluation_on_the_candidates_own_seeds_is_refused(
    small_cfg: Config, small_actors: Path, cem_artifact: Path, tmp_path: Path
) -> None:
    """The evaluation config is overridden to name other training seeds; the candidate's manifest still says which
    seeds it saw, and the evaluation refuses them."""
    from unexrl.contracts.artifact import peek_manifest
    from unexrl.pipeline.evaluation import evaluate_release

    seen = peek_manifest(small_actors).seen_seeds
    cfg = small_cfg.model_copy(
        update={"seeds": small_cfg.seeds.model_copy(update={"train": (9990,), "validation": (9991,)})}
    )
    with pytest.raises(
        ValueError, match=f"seeds \\[{seen[0]}\\] are among the seeds the candidate's manifest says it saw"
    ):
        evaluate_release(
            cfg, candidate=small_actors, cem=cem_artifact, incumbent=None, out=tmp_path / "e", seeds=[seen[0]]
        )
    assert not (tmp_path / "e").exists()
