"""`unexrl experiment`: the same table whether runs go through one process or a pool of workers, and resumable."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

from unexrl.config import load_config
from unexrl.contracts.base import ContractError
from unexrl.experiment import METRICS, Run, results_markdown, run_experiment, summarise

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment.variants=[cem,group-cem,td3]",
    "experiment.seeds=1",
    "experiment.agents_seeds=1",
    "experiment.agents_algos=[unexrl-cic]",
    "experiment.eval_sessions_per_seed=30",
    "seeds.evaluation=[3000,3001]",
    "cem.iterations=2",
    "cem.population=6",
    "cem.sessions_per_candidate=8",
    "train.updates=4",
    "train.eval_every=2",
    "train.eval_sessions=10",
    "train.warmup_sessions=16",
    "train.sessions_per_collect=8",
    "train.updates_per_collect=2",
    "algo.batch_size=16",
    "algo.hidden=16",
    "evaluation.bootstrap=50",
]


@pytest.fixture(autouse=True)
def _one_thread(single_thread: Callable[[], AbstractContextManager[None]]) -> Iterator[None]:
    with single_thread():
        yield


def test_workers_give_the_same_results_as_one_process_and_runs_resume(tmp_path: Path) -> None:
    results = {}
    for workers in (1, 2):
        cfg = load_config(ROOT / "configs" / "small.yaml", [*TINY, f"experiment.workers={workers}"])
        results[workers] = run_experiment(cfg, tmp_path / f"w{workers}")
        assert (tmp_path / f"w{workers}" / "results.md").is_file()
        assert (tmp_path / f"w{workers}" / "learning_curves.png").is_file()
    one, two = results[1], results[2]
    assert (
        set(one["table"]) == {"cem", "group-cem", "td3"} and len(one["agents_study"]) == 5
    )  # CEM + CIC, 1..4 agents
    assert "diagnostics" in one["table"]["td3"] and "diagnostics" not in one["table"]["cem"]
    group_cem = one["table"]["group-cem"]["group_actions"]
    assert len(group_cem) == 3 and group_cem[0] != group_cem[1]  # a table per activity group
    assert _measured(one) == _measured(two)  # seeds decide the results, not the process layout

    # a re-run loads every finished run instead of training it again
    runs = tmp_path / "w1" / "runs" / "main" / "td3-seed0.json"
    stamp = runs.stat().st_mtime_ns
    cfg = load_config(ROOT / "configs" / "small.yaml", TINY)
    again = run_experiment(cfg, tmp_path / "w1")
    assert runs.stat().st_mtime_ns == stamp
    assert json.dumps(_measured(again), sort_keys=True) == json.dumps(_measured(one), sort_keys=True)

    # a saved run is a contract: one written by other code, or under another run's name, is refused by name
    record = json.loads(runs.read_text())
    runs.write_text(json.dumps({**record, "n_eval_seeds": 2}))
    with pytest.raises(
        ContractError, match=r"td3-seed0\.json.*n_eval_seeds.*delete it to run td3-seed0 again"
    ):
        run_experiment(cfg, tmp_path / "w1")
    runs.write_text(json.dumps({**record, "variant": "cem"}))
    with pytest.raises(ContractError, match=r"td3-seed0\.json: holds cem seed 0"):
        run_experiment(cfg, tmp_path / "w1")
    # a record as the experiment wrote it before RunRecord (no schema version, each curve point with its losses)
    untyped = {k: v for k, v in record.items() if k not in ("schema_version", "eval_seeds")}
    untyped |= {
        "n_eval_seeds": record["eval_seeds"],
        "curve": [p | {"critic_loss": 1.0} for p in record["curve"]],
    }
    runs.write_text(json.dumps(untyped))
    assert json.dumps(_measured(run_experiment(cfg, tmp_path / "w1")), sort_keys=True) == json.dumps(
        _measured(one), sort_keys=True
    )
    runs.write_text(json.dumps(record))
    runs.with_suffix(".npz").write_bytes(b"cut short")
    with pytest.raises(
        ContractError, match=r"td3-seed0\.npz: unreadable outcomes.*delete it to run td3-seed0"
    ):
        run_experiment(cfg, tmp_path / "w1")


def _measured(results: dict) -> dict:
    """Everything but wall times."""

    def without_seconds(value: object) -> object:
        if isinstance(value, dict):
            return {
                k: without_seconds(v) for k, v in value.items() if k not in ("train_seconds_mean", "seconds")
            }
        return [without_seconds(v) for v in value] if isinstance(value, list) else value

    return {"table": without_seconds(results["table"]), "agents_study": results["agents_study"]}


def test_every_row_is_compared_with_cic_paired_by_session() -> None:
    """CIC's uplift over each other row is paired by training seed and session: a 5% difference on the same sessions
    is measured as 5% with a tight interval, though the sessions themselves vary far more than that."""
    cfg = load_config(ROOT / "configs" / "small.yaml")
    rng = np.random.default_rng(0)
    sessions = {k: [rng.gamma(2.0, 500.0, size=200) for _ in range(2)] for k in range(3)}  # [seed][eval seed]

    def runs(variant: str, scale: float) -> list[Run]:
        return [
            Run(variant, k, None, {m: [scale * v for v in sessions[k]] for m in METRICS}, [], 1.0, [[0.0]])
            for k in sessions
        ]

    results = summarise(
        [*runs("cem", 1.0), *runs("unexrl-ctde", 1.2), *runs("unexrl-cic", 1.26)], [], cfg, 1.0
    )
    table = results["table"]
    cic_over_ctde = table["unexrl-ctde"]["cic_uplift_over_this_pct"]
    assert cic_over_ctde["mean"] == pytest.approx(5.0)
    assert cic_over_ctde["high"] - cic_over_ctde["low"] < 1e-6  # every replicate sees the same 5%
    assert table["cem"]["cic_uplift_over_this_pct"]["mean"] == pytest.approx(26.0)
    assert "cic_uplift_over_this_pct" not in table["unexrl-cic"]
    assert "| unexrl-ctde |" in results_markdown(
        results
    ) and "unexrl-cic over this row (%)" in results_markdown(results)
    # without CIC in the experiment, or on other training seeds, there is nothing to pair with
    alone = summarise([*runs("cem", 1.0), *runs("unexrl-ctde", 1.2)], [], cfg, 1.0)
    assert "cic_uplift_over_this_pct" not in alone["table"]["unexrl-ctde"]
    other_seeds = [r for r in runs("unexrl-cic", 1.26) if r.seed != 0]
    partial = summarise([*runs("unexrl-ctde", 1.2), *other_seeds], [], cfg, 1.0)
    assert "cic_uplift_over_this_pct" not in partial["table"]["unexrl-ctde"]
