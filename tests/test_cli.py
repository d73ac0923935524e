"""The command line end to end on the small config: simulate -> cem -> evaluate, errors that name the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from unexrl.cli import main
from unexrl.data import read_logs

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config", str(ROOT / "configs" / "small.yaml")]
FAST = [
    "--set",
    "cem.iterations=2",
    "--set",
    "cem.population=4",
    "--set",
    "cem.sessions_per_candidate=4",
    "--set",
    "logging.sessions=40",
    "--set",
    "evaluation.sessions_per_seed=40",
    "--set",
    "evaluation.bootstrap=50",
]


@pytest.mark.parametrize("command", [[], ["simulate"], ["evaluate"], ["cem"], ["run"], ["bench", "sim"]])
def test_help_explains_every_subcommand(command: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "unexrl", *command, "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: unexrl" in out.stdout
    if command:
        assert "--config" in out.stdout and "--set" in out.stdout


def test_simulate_cem_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    assert main(["simulate", *SMALL, *FAST, "--out", str(logs)]) == 0
    data = read_logs(logs)
    assert data.transitions.num_rows > 40
    assert data.manifest.behaviour["kind"] == "cem"

    assert main(["cem", *SMALL, *FAST, "--out", str(tmp_path / "cem")]) == 0
    assert (
        main(
            [
                "evaluate",
                *SMALL,
                *FAST,
                "--policy",
                f"cem={tmp_path / 'cem'}",
                "--json",
                str(tmp_path / "e.json"),
                "--md",
                str(tmp_path / "e.md"),
                "--png",
                str(tmp_path / "e.png"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["policies"]) == {"random", "greedy", "cem"}
    assert result["seeds"] == [3000, 3001, 3002]
    assert "| cem |" in (tmp_path / "e.md").read_text()
    assert (tmp_path / "e.png").stat().st_size > 1000
    assert "watch time / session" in capsys.readouterr().out

    # simulating into existing logs refuses and keeps them
    assert main(["simulate", *SMALL, *FAST, "--out", str(logs)]) == 2
    assert read_logs(logs).transitions.num_rows == data.transitions.num_rows


def test_evaluate_tunes_baselines_beside_the_artifacts(tmp_path: Path) -> None:
    """`--baseline group-cem` puts the per-activity-group table beside CEM: one weight vector per group."""
    assert (
        main(
            [
                "evaluate",
                *SMALL,
                *FAST,
                "--no-references",
                "--baseline",
                "cem",
                "--baseline",
                "group-cem",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    assert set(json.loads((tmp_path / "e.json").read_text())["policies"]) == {"cem", "group-cem"}


def test_log_seed_must_be_a_training_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "simulate",
            *SMALL,
            *FAST,
            "--set",
            "logging.kind=random",
            "--seed",
            "3000",
            "--out",
            str(tmp_path / "l"),
        ]
    )
    assert code == 2
    assert "seeds.train" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()


def test_bad_override_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", *SMALL, "--set", "evaluation.sessions_per_sed=5"]) == 2
    assert "evaluation.sessions_per_sed" in capsys.readouterr().err


def test_tampered_policy_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cem", *SMALL, *FAST, "--out", str(tmp_path / "cem")]) == 0
    (tmp_path / "cem" / "weights.pt").write_bytes(b"not the weights")
    assert main(["evaluate", *SMALL, *FAST, "--policy", f"cem={tmp_path / 'cem'}"]) == 2
    assert "tampered" in capsys.readouterr().err


def test_bench_sim_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "sim",
                *SMALL,
                "--set",
                "bench.repeats=2",
                "--set",
                "bench.sim_batch=64",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    rps = result["requests_per_s"]
    assert set(rps) == {
        "memory_bound",
        "lean_reference",
        "cascade",
        "simulator_step",
        "full_step_with_observation",
    }
    assert all(v > 0 for v in rps.values())
    assert result["ratios"]["cascade_vs_lean_reference"] > 0


def _bench_train(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    sets = ["bench.repeats=2", "bench.large_batch=64", "algo.batch_size=32"]
    assert main(["bench", "train", *SMALL, *(x for s in sets for x in ("--set", s)), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_train_times_the_update_it_names(tmp_path: Path) -> None:
    """The CIC update is timed with its actor step (it once was not: actor_start exceeded the bench's updates), the
    critic-only step without one, and every ratio the issue reads is there."""
    result = _bench_train(tmp_path)
    assert result["not_measured"] == {}
    assert result["actor_step_share"] == {
        "unexrl-cic": 1.0,
        "unexrl-cic-critic": 0.0,
        "unexrl-cic-compiled": 1.0,
        "unexrl-ctde": 1.0,
    }
    assert set(result["transitions_per_s"]) == {*result["actor_step_share"], "raw_ebc"}
    assert all(v > 0 for v in result["transitions_per_s_large_batch"].values())
    assert set(result["compile_seconds"]) == {"32", "64"}
    assert {
        "cic_update_vs_raw_ebc",
        "cic_compiled_update_vs_raw_ebc",
        "cic_critic_step_vs_raw_ebc",
        "cic_vs_ctde",
    } <= set(result["ratios"])


def test_without_a_cpp_compiler_compile_is_refused_up_front_and_the_bench_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No compiler for inductor (the search list points at nothing): an agent with train.compile refuses to be
    built, naming the option, and `bench train` measures the eager candidates and says why the compiled one is
    missing."""
    import torch._inductor.config

    from unexrl.config import load_config
    from unexrl.rl.agent import CascadeAgent

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    cfg = load_config(ROOT / "configs" / "small.yaml")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    with pytest.raises(RuntimeError, match="train.compile=true needs a C\\+\\+ compiler"):
        CascadeAgent(cfg, 10, 100, 5, torch.full((1, sum(cfg.cascade.action_dims)), 0.5))
    result = _bench_train(tmp_path)
    assert set(result["not_measured"]) == {"unexrl-cic-compiled"}
    assert set(result["transitions_per_s"]) == {"unexrl-cic", "unexrl-cic-critic", "unexrl-ctde", "raw_ebc"}
    assert "cic_compiled_update_vs_raw_ebc" not in result["ratios"]
    assert result["ratios"]["cic_update_vs_raw_ebc"] > 0
