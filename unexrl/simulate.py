"""Write logs: run a behaviour policy in the simulator and record every request in the log contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unexrl.data import LogWriter
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import GaussianExploration, RandomPolicy, WeightPolicy
from unexrl.sim.env import Policy, Simulator


def behaviour_policy(sim: Simulator, base: WeightPolicy | None, seed: int) -> tuple[Policy, dict[str, Any]]:
    """The logging policy for ``cfg.logging``: random weights, or ``base`` plus Gaussian exploration."""
    cfg = sim.cfg
    if cfg.logging.kind == "random":
        return RandomPolicy(cfg.cascade, seed=seed), {"kind": "random"}
    if base is None:
        raise ValueError(f"logging.kind={cfg.logging.kind} needs a base policy (tuned CEM or --policy)")
    description = {
        "kind": cfg.logging.kind,
        "group_by": base.group_by,
        "weights": base.weights.cpu().tolist(),
        "exploration_std": cfg.logging.exploration_std,
    }
    return GaussianExploration(base, cfg.logging.exploration_std, seed=seed), description


def simulate_logs(
    sim: Simulator,
    policy: Policy,
    description: dict[str, Any],
    out: Path,
    seed: int,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Roll ``policy`` out for ``cfg.logging.sessions`` sessions of ``seed`` and write the log directory."""
    cfg = sim.cfg
    if seed not in cfg.seeds.train:
        raise ValueError(
            f"log seed {seed} is not one of seeds.train {list(cfg.seeds.train)}: logs are training data"
        )
    with LogWriter(cfg, sim.world, out, overwrite=overwrite) as writer:
        rollout(
            sim,
            policy,
            seed,
            cfg.logging.sessions,
            cfg.logging.batch_size,
            on_step=writer.add,
            progress=progress,
        )
        return writer.close(behaviour=description, seeds=[seed])
