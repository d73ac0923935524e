"""`unexrl experiment`: the paper's Table 1 and its agents-count question, on our simulator.

Every variant is trained ``experiment.seeds`` times (seed k shifts seeds.train by 100 k; the world and the
evaluation seeds stay fixed); the actors of its best validation point (seeds.validation) are then rolled out on
seeds.evaluation. The fixed-weight baselines (unexrl/policies/baselines.py: cem, group-cem and the two oracles)
are tuned once per training seed and kept on disk. Every learner's final critic in the main comparison (not in
the agents-count study) is diagnosed against the simulator's truth (unexrl/rl/diagnostics.py, on a validation
seed), and every policy's mean action per activity
group is recorded (does it personalise?). Intervals are 95% bootstrap intervals over
(training seed, evaluation seed) groups and sessions; uplifts are paired by session against CEM of the same
training seed. Each finished run is saved under ``out/runs/`` and skipped when the experiment is re-run, so an
interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unexrl.config import BASELINES, Config
from unexrl.contracts.base import ContractError
from unexrl.contracts.diagnostics import CriticDiagnostics
from unexrl.contracts.experiment import RunRecord
from unexrl.contracts.training import ValidationScore
from unexrl.evaluate.rollout import rollout
from unexrl.evaluate.stats import Estimate, bootstrap_mean, bootstrap_uplift
from unexrl.io import atomic_write_text, write_figure
from unexrl.policies.baselines import tune_baseline
from unexrl.policies.weights import WeightPolicy
from unexrl.rl.diagnostics import diagnose, signed
from unexrl.rl.policy import ActorPolicy
from unexrl.sim.env import Policy, Simulator, Step
from unexrl.sim.world import World
from unexrl.train.loop import train

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "ddpg": {"name": "ddpg"},
    "td3": {"name": "td3"},
    "unexrl-ctde": {"name": "unexrl-ctde"},
    "unexrl-cic": {"name": "unexrl-cic"},
    "unexrl-cic-no-sg": {"name": "unexrl-cic", "sg": False},
    "unexrl-cic-no-cqr": {"name": "unexrl-cic", "cqr": False},
    "unexrl-cic-plain-step": {"name": "unexrl-cic", "proximal": 0.0},
    "unexrl-cic-no-features": {"name": "unexrl-cic", "user_features": False},
    "independent-ddpg": {"name": "independent-ddpg"},
}
"""Learner rows: the algo config each one trains with (unexrl-cic-plain-step: the paper's DDPG-style actor step,
without the proximal term; unexrl-cic-no-features: without the user's behaviour features in its inputs)."""

METRICS = ("watch_time", "items", "requests")

PAIRED_LEARNER = "unexrl-cic"
"""every other row is also compared with this one, paired (``cic_uplift_over_this_pct``): the method's own
differences (CIC vs CTDE, with and without SG, CQR, the features) are smaller than the CEM-relative intervals"""


def seed_config(cfg: Config, k: int) -> Config:
    """Training seed k: seeds.train shifted by 100 k (validated to stay apart from validation/evaluation)."""
    seeds = cfg.seeds.model_copy(update={"train": tuple(s + 100 * k for s in cfg.seeds.train)})
    return Config.model_validate_json(cfg.model_copy(update={"seeds": seeds}).model_dump_json())


def variant_config(cfg: Config, variant: str, agents: int | None = None) -> Config:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown experiment variant {variant!r}; known: {', '.join((*BASELINES, *VARIANTS))}"
        )
    algo = cfg.algo.model_copy(update={**VARIANTS[variant], "agents": agents})
    return cfg.model_copy(update={"algo": algo})


@dataclass
class Run:
    """One trained (or tuned) policy evaluated on the evaluation seeds."""

    variant: str
    seed: int
    agents: int | None
    outcomes: dict[str, list[np.ndarray]]
    """metric -> one array of per-session values per evaluation seed"""
    curve: list[ValidationScore]
    seconds: float
    group_actions: list[list[float]]
    """[activity group][weight] mean action on the first evaluation seed's requests"""
    diagnostics: CriticDiagnostics | None = None
    """the final critic's diagnostics (learners only)"""

    def save(self, path: Path) -> None:
        """The outcomes' ``.npz``, then the record (atomically): the record's presence marks a complete run."""
        arrays = {f"{m}_{i}": v for m, vs in self.outcomes.items() for i, v in enumerate(vs)}
        np.savez(path.with_suffix(".npz"), **arrays)
        RunRecord(
            variant=self.variant,
            seed=self.seed,
            agents=self.agents,
            curve=self.curve,
            seconds=self.seconds,
            eval_seeds=len(self.outcomes["watch_time"]),
            group_actions=self.group_actions,
            diagnostics=self.diagnostics,
        ).write(path.with_suffix(".json"))

    @staticmethod
    def load(path: Path) -> Run:
        """A saved run; ContractError names the file when its record or its outcomes are not what save wrote."""
        record = RunRecord.read(path.with_suffix(".json"))
        npz = path.with_suffix(".npz")
        try:
            with np.load(npz) as arrays:
                outcomes = {m: [arrays[f"{m}_{i}"] for i in range(record.eval_seeds)] for m in METRICS}
        except KeyError as err:
            raise ContractError(f"{npz}: no outcomes {err}") from None
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ContractError(f"{npz}: unreadable outcomes ({type(err).__name__}: {err})") from None
        return Run(
            record.variant,
            record.seed,
            record.agents,
            outcomes,
            record.curve,
            record.seconds,
            record.group_actions,
            record.diagnostics,
        )


def _evaluate(
    cfg: Config, sim: Simulator, policy: Policy
) -> tuple[dict[str, list[np.ndarray]], list[list[float]]]:
    """Outcomes on every evaluation seed, and the mean action per activity group on the first one."""
    n = cfg.experiment.eval_sessions_per_seed
    n_groups = len(cfg.world.user_types)
    sums = torch.zeros(n_groups, sum(cfg.cascade.action_dims), dtype=torch.float64)
    counts = torch.zeros(n_groups, dtype=torch.float64)

    def record(step: Step) -> None:
        group = step.obs.activity_group[step.active].cpu()
        sums.index_add_(0, group, torch.cat(step.cascade.actions, dim=1)[step.active].cpu().double())
        counts.index_add_(0, group, torch.ones_like(group, dtype=torch.float64))

    outs = [
        rollout(sim, policy, s, n, min(n, cfg.evaluation.batch_size), on_step=record if i == 0 else None)
        for i, s in enumerate(cfg.seeds.evaluation)
    ]
    actions = (sums / counts.clamp_min(1)[:, None]).tolist()
    return {m: [getattr(o, m) for o in outs] for m in METRICS}, actions


def _baseline(cfg: Config, sim: Simulator, name: str, k: int, folder: Path) -> WeightPolicy:
    """Baseline ``name`` of training seed k, tuned once per cascade and kept in ``folder`` for the other runs and
    for a resume (every baseline but CEM starts from this seed's CEM)."""
    path = folder / f"{name}-seed{k}.pt"
    group_by = {
        "group-cem": "activity_group",
        "oracle-group-cem-ranking": "oracle_type",
        "oracle-group-cem-all": "oracle_type",
    }.get(name, "none")
    if path.is_file():
        return WeightPolicy(
            torch.load(path, weights_only=True).to(sim.world.item_category.device),
            cfg.cascade,
            group_by=group_by,
        )  # type: ignore[arg-type]
    cem = None if name == "cem" else _baseline(cfg, sim, "cem", k, folder)
    policy = tune_baseline(name, sim, cem, progress=False)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(policy.weights.cpu(), tmp)
    tmp.replace(path)
    return policy


_WORLDS: dict[str, World] = {}
"""this process's worlds by config name (a world depends only on the world config and seeds.world)"""


def _run(cfg: Config, variant: str, k: int, agents: int | None, folder: Path) -> Run:
    name = f"{variant}-seed{k}" + (f"-agents{agents}" if agents is not None else "")
    path = folder / name
    if path.with_suffix(".json").exists():
        try:
            run = Run.load(path)
        except ContractError as err:
            raise ContractError(f"{err} (a run saved by other code? delete it to run {name} again)") from None
        if (run.variant, run.seed, run.agents) != (variant, k, agents):
            raise ContractError(
                f"{path.with_suffix('.json')}: holds {run.variant} seed {run.seed} agents {run.agents}, "
                f"not {variant} seed {k} agents {agents}"
            )
        return run
    kcfg = seed_config(cfg, k)
    started = time.perf_counter()
    if cfg.name not in _WORLDS:
        _WORLDS[cfg.name] = Simulator(cfg).world
    sim = Simulator(kcfg, world=_WORLDS[cfg.name])
    diagnostics = None
    if variant in BASELINES:
        policy: Policy = _baseline(kcfg, sim, variant, k, folder)
        # on the validation sessions the learners' curves are measured on: the reference lines of their plot
        t = kcfg.train
        validation = rollout(sim, policy, kcfg.seeds.validation[0], t.eval_sessions, t.eval_sessions)
        curve = [ValidationScore(updates=0, validation_watch_time=float(validation.watch_time.mean()))]
    else:
        cem = _baseline(kcfg, sim, "cem", k, folder)
        vcfg = variant_config(kcfg, variant, agents)
        # the final critic is diagnosed below; diagnoses at every validation point would double a run's cost
        vcfg = vcfg.model_copy(
            update={"diagnostics": vcfg.diagnostics.model_copy(update={"during_training": False})}
        )
        result = train(vcfg, cem.weights, sim, progress=False)
        # model selection on seeds.validation (train.select), as the export of `unexrl train` makes it
        selected, _ = result.selected(kcfg.train.select)
        actors = selected if selected is not None else result.agent.actors
        policy = ActorPolicy(actors, vcfg, sim.world)
        curve = [
            ValidationScore(updates=p.updates, validation_watch_time=p.validation_watch_time)
            for p in result.curve
        ]
        if (
            cfg.experiment.diagnose and agents is None
        ):  # the final critic, with the final actors it was trained for
            diagnostics = diagnose(result.agent, sim, result.agent.actors, result.knots)
    outcomes, group_actions = _evaluate(kcfg, sim, policy)
    run = Run(variant, k, agents, outcomes, curve, time.perf_counter() - started, group_actions, diagnostics)
    run.save(path)
    log.info(
        "%s: watch time %.0f s (%.0f s)", name, np.concatenate(run.outcomes["watch_time"]).mean(), run.seconds
    )
    return run


def _one_thread() -> None:
    torch.set_num_threads(1)  # workers share the cores: one intra-op thread each


def run_experiment(cfg: Config, out: Path) -> dict[str, Any]:
    """Train and evaluate every variant (and the agents-count study); write results.json/.md and plots."""
    from tqdm.auto import tqdm

    e = cfg.experiment
    runs_dir = out / "runs"
    four = cfg.model_copy(
        update={
            "cascade": cfg.cascade.model_copy(update={"stages": e.agents_stages}),
            "name": f"{cfg.name}-4stage",
        }
    )
    four = Config.model_validate_json(four.model_dump_json())
    # CEM runs first (in one process by this order, with workers as a first wave): the other runs of a seed read
    # its tuned weights from disk
    main_jobs = sorted(
        ((v, k, None) for k in range(e.seeds) for v in e.variants), key=lambda j: j[0] != "cem"
    )
    study_jobs = sorted(
        (
            (v, k, n)
            for k in range(e.agents_seeds)
            for v in ("cem", *e.agents_algos)
            for n in ((None,) if v == "cem" else range(1, len(e.agents_stages) + 1))
        ),
        key=lambda j: j[0] != "cem",
    )
    for variant in {*e.variants, *e.agents_algos} - {*BASELINES, *VARIANTS}:
        raise ValueError(
            f"unknown experiment variant {variant!r}; known: {', '.join((*BASELINES, *VARIANTS))}"
        )
    jobs = [(cfg, *j, runs_dir / "main") for j in main_jobs] + [
        (four, *j, runs_dir / "agents") for j in study_jobs
    ]
    for folder in ("main", "agents"):
        (runs_dir / folder).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tqdm(total=len(jobs), desc="experiment") as bar:
        if e.workers == 1:
            runs = []
            for job in jobs:
                runs.append(_run(*job))
                bar.update(1)
        else:
            spawn = multiprocessing.get_context(
                "spawn"
            )  # never fork a process whose torch threads have started
            with ProcessPoolExecutor(e.workers, mp_context=spawn, initializer=_one_thread) as pool:
                futures: dict[int, Future[Run]] = {}
                waves = (
                    [i for i, j in enumerate(jobs) if j[1] == "cem"],
                    [i for i, j in enumerate(jobs) if j[1] != "cem"],
                )
                try:  # CEM runs as a first wave: every later run of a seed reads its tuned weights from disk
                    for wave in waves:
                        futures |= {i: pool.submit(_run, *jobs[i]) for i in wave}
                        for done in as_completed([futures[i] for i in wave]):
                            done.result()  # a failed run stops the experiment here, with its error
                            bar.update(1)
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # do not wait for the queued runs
                    raise
                runs = [futures[i].result() for i in range(len(jobs))]
    main_runs, study_runs = runs[: len(main_jobs)], runs[len(main_jobs) :]
    results = summarise(main_runs, study_runs, cfg, time.perf_counter() - started)
    write_results(results, out)
    return results


def _group(runs: list[Run], metric: str) -> list[np.ndarray]:
    return [v for r in sorted(runs, key=lambda r: r.seed) for v in r.outcomes[metric]]


def _paired_uplift(candidate: list[Run], reference: list[Run], n_boot: int) -> dict[str, float] | None:
    """The candidate's watch-time uplift over the reference in percent, paired by training seed and session (both
    were rolled out on the same evaluation sessions); None unless both ran the same training seeds."""
    if not candidate or {r.seed for r in candidate} != {r.seed for r in reference}:
        return None
    return bootstrap_uplift(
        _group(candidate, "watch_time"), _group(reference, "watch_time"), n_boot
    ).as_dict()


def summarise(main_runs: list[Run], agent_runs: list[Run], cfg: Config, seconds: float) -> dict[str, Any]:
    n_boot = cfg.evaluation.bootstrap
    table: dict[str, Any] = {}
    by_variant: dict[str, list[Run]] = {}
    for r in main_runs:
        by_variant.setdefault(r.variant, []).append(r)
    cem_runs = by_variant.get("cem", [])
    cic_runs = by_variant.get(PAIRED_LEARNER, [])
    for variant, runs in by_variant.items():
        row = {m: bootstrap_mean(_group(runs, m), n_boot).as_dict() for m in METRICS}
        if variant != "cem" and (uplift := _paired_uplift(runs, cem_runs, n_boot)) is not None:
            row["uplift_vs_cem_pct"] = uplift
        if variant != PAIRED_LEARNER and (uplift := _paired_uplift(cic_runs, runs, n_boot)) is not None:
            row["cic_uplift_over_this_pct"] = uplift
        row["train_seconds_mean"] = float(np.mean([r.seconds for r in runs]))
        row["curve"] = _mean_curve(runs)
        row["group_actions"] = np.mean([r.group_actions for r in runs], axis=0).tolist()
        diagnosed = [r.diagnostics for r in runs if r.diagnostics is not None]
        if diagnosed:
            row["diagnostics"] = {
                "per_seed": [d.model_dump() for d in diagnosed],
                "mean": _diagnostics_mean(diagnosed),
            }
        table[variant] = row
    study: dict[str, Any] = {}
    for r in agent_runs:
        key = "cem" if r.agents is None else f"{r.variant}/{r.agents}"
        study.setdefault(key, []).append(r)
    study_rows = {
        key: bootstrap_mean(_group(runs, "watch_time"), n_boot).as_dict() for key, runs in study.items()
    }
    return {
        "config": cfg.name,
        "seeds": cfg.experiment.seeds,
        "evaluation_seeds": list(cfg.seeds.evaluation),
        "eval_sessions_per_seed": cfg.experiment.eval_sessions_per_seed,
        "train_updates": cfg.train.updates,
        "seconds": round(seconds, 1),
        "weights": [f"{st.name}.{h}" for st in cfg.cascade.stages for h in st.heads],
        "groups": [t.name for t in cfg.world.user_types],
        "table": table,
        "agents_study": study_rows,
    }


def _diagnostics_mean(diagnosed: list[CriticDiagnostics]) -> dict[str, Any]:
    """The headline diagnostics averaged over training seeds (each seed's full record stays in per_seed)."""

    def mean(read: Callable[[CriticDiagnostics], float | list[float]]) -> Any:
        return np.mean([read(d) for d in diagnosed], 0).tolist()

    return {
        "calibration.relative_bias": mean(lambda d: d.calibration.relative_bias),
        "calibration.correlation": mean(lambda d: d.calibration.correlation),
        "gradient.cosine": mean(lambda d: d.gradient.cosine.mean),
        "gradient.cosine_per_group": mean(lambda d: d.gradient.cosine.per_group),
        "gradient.sign_agreement": mean(lambda d: d.gradient.sign_agreement.mean),
        "gradient.cosine_training_return": mean(lambda d: d.gradient.cosine_training_return.mean),
        "gradient.truth_split_half_cosine": mean(
            lambda d: float(np.mean(d.gradient.truth_split_half_cosine))
        ),
        "reward_alignment": mean(lambda d: d.reward_alignment.mean),
    }


def _mean_curve(runs: list[Run]) -> list[dict[str, float]]:
    if not runs or not runs[0].curve:
        return []
    points = min(len(r.curve) for r in runs)
    return [
        {
            "updates": runs[0].curve[i].updates,
            "validation_watch_time": float(np.mean([r.curve[i].validation_watch_time for r in runs])),
        }
        for i in range(points)
    ]


def write_results(results: dict[str, Any], out: Path) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", results_markdown(results))
    plot_results(results, out)


def _fmt(e: dict[str, float], digits: int = 0) -> str:
    return Estimate(**e).fmt(digits)


def results_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Experiment: config `{results['config']}`",
        "",
        (
            f"{results['seeds']} training seeds per row; evaluation on seeds {results['evaluation_seeds']} x "
            f"{results['eval_sessions_per_seed']} sessions; 95% bootstrap CIs over (training seed, evaluation seed) "
            f"and sessions; uplifts paired by session against CEM, and of {PAIRED_LEARNER} over each row, of the "
            f"same training seed. {results['train_updates']} updates per training run; the actors of the best "
            f"validation point are evaluated. Wall time {results['seconds']:.0f} s."
        ),
        "",
        (
            "| variant | watch time / session (s) | session length (items) | requests / session | uplift vs CEM (%) "
            f"| {PAIRED_LEARNER} over this row (%) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for variant, row in results["table"].items():
        uplift, cic = (
            _fmt(row[k], 1) if k in row else "-" for k in ("uplift_vs_cem_pct", "cic_uplift_over_this_pct")
        )
        lines.append(
            f"| {variant} | {_fmt(row['watch_time'])} | {_fmt(row['items'], 1)} | {_fmt(row['requests'], 2)} "
            f"| {uplift} | {cic} |"
        )
    diagnosed = {v: row["diagnostics"]["mean"] for v, row in results["table"].items() if "diagnostics" in row}
    if diagnosed:
        header = (
            "| variant | relative bias | correlation | gradient cosine (mean; per group) | sign agreement "
            "| truth repeatability | cosine vs training return | reward alignment |"
        )
        lines += [
            "",
            "## Final critic diagnostics (validation seed; mean over training seeds)",
            "",
            header,
            "|---|---|---|---|---|---|---|---|",
        ]
        for v, d in diagnosed.items():
            per_group = " / ".join(signed(x) for x in d["gradient.cosine_per_group"])
            lines.append(
                f"| {v} | {d['calibration.relative_bias']:+.0%} | {d['calibration.correlation']:.2f} "
                f"| {d['gradient.cosine']:+.2f} ({per_group}) | {d['gradient.sign_agreement']:.2f} "
                f"| {d['gradient.truth_split_half_cosine']:.2f} | {d['gradient.cosine_training_return']:+.2f} "
                f"| {d['reward_alignment']:+.2f} |"
            )
    lines += [
        "",
        "## Mean action per activity group (first evaluation seed; mean over training seeds)",
        "",
        (
            "Does a learner personalise? Each cell: the policy's mean weight for that group; group-cem's are its "
            "tuned table."
        ),
        "",
        "| variant | group | " + " | ".join(results["weights"]) + " |",
        "|---|---|" + "---|" * len(results["weights"]),
    ]
    for variant, row in results["table"].items():
        for g, actions in enumerate(row["group_actions"]):
            lines.append(
                f"| {variant} | {results['groups'][g]} | " + " | ".join(f"{x:+.2f}" for x in actions) + " |"
            )
    if results["agents_study"]:
        lines += [
            "",
            "## Agents-count study (4-stage cascade; learning stages counted from ranking, rest at CEM)",
            "",
            "| algo / agents | watch time / session (s) |",
            "|---|---|",
        ]
        lines += [f"| {key} | {_fmt(e)} |" for key, e in results["agents_study"].items()]
    lines += ["", "![learning curves](learning_curves.png)", ""]
    if results["agents_study"]:
        lines += ["![agents](agents.png)", ""]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, row in results["table"].items():
        if row["curve"] and variant not in BASELINES:
            ax.plot(
                [p["updates"] for p in row["curve"]],
                [p["validation_watch_time"] for p in row["curve"]],
                label=variant,
            )
    for variant, style in (("cem", "--"), ("group-cem", ":")):
        reference = results["table"].get(variant, {}).get("curve")
        if reference:  # the same validation sessions as the curves
            ax.axhline(reference[0]["validation_watch_time"], color="k", ls=style, label=variant)
    _save(fig, ax, "updates", "validation watch time / session (s)", out / "learning_curves.png")

    study = results["agents_study"]
    if not study:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    algos = sorted({k.split("/")[0] for k in study if "/" in k})
    for algo in algos:
        pts = sorted((int(k.split("/")[1]), e) for k, e in study.items() if k.startswith(algo + "/"))
        xs = [n for n, _ in pts]
        ax.errorbar(
            xs,
            [e["mean"] for _, e in pts],
            yerr=[[e["mean"] - e["low"] for _, e in pts], [e["high"] - e["mean"] for _, e in pts]],
            marker="o",
            capsize=3,
            label=algo,
        )
    if "cem" in study:
        ax.axhline(study["cem"]["mean"], color="k", ls="--", label="cem")
    _save(
        fig, ax, "learning agents (from the ranking stage up)", "watch time / session (s)", out / "agents.png"
    )


def _save(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure(fig, path)
