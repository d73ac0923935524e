"""`unexrl diagnose`: the critic diagnostics (unexrl/rl/diagnostics.py) of a training run directory.

The critic is not exported (serving needs only the actors), so the run's newest checkpoint is loaded into an
unsharded agent in one process, whatever world size wrote it (DCP reshards), and scored against the simulator's
truth with its own CQR knots and input scaling. Writes ``diagnostics.json``, ``diagnostics.md`` and
``diagnostics.png`` into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unexrl.config import Config
from unexrl.contracts.diagnostics import CriticDiagnostics
from unexrl.io import atomic_write_text
from unexrl.rl.agent import CascadeAgent
from unexrl.rl.cqr import n_item_groups
from unexrl.rl.diagnostics import (
    diagnose,
    diagnostics_markdown,
    plot_diagnostics,
    weight_names,
)
from unexrl.sim.env import Simulator
from unexrl.train.checkpoint import Checkpoints
from unexrl.train.distributed import Context

RUN_CONFIG = "config.json"
"""the resolved config a run was trained with, written by `unexrl train` before it starts"""
TRAINED_WITH = ("world", "cascade", "session", "algo", "features", "seeds")
"""config sections that decide what a checkpoint holds: diagnosing with other values would misread it"""
WHERE_FEATURES_LIVE = ("repo", "environment", "item_cache_check_s", "bench_reads", "bench_candidates")
"""``features`` fields that say where the store is and how serving reads it, not what the features are"""


def _what_it_learned_from(config: dict[str, Any]) -> dict[str, Any]:
    features = {k: v for k, v in config.get("features", {}).items() if k not in WHERE_FEATURES_LIVE}
    return config | {"features": features}


def check_run_config(cfg: Config, run: Path) -> None:
    """Refuse a config that differs from the run's own in a section its networks and rewards depend on."""
    path = run / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {RUN_CONFIG}; is this an `unexrl train --out` directory?")
    trained, given = (_what_it_learned_from(c) for c in (json.loads(path.read_text()), cfg.to_dict()))
    differ = [k for k in TRAINED_WITH if trained.get(k) != given.get(k)]
    if differ:
        raise ValueError(
            f"{run} was trained with other {', '.join(differ)} settings than --config/--set give "
            f"(see {path}); pass the run's own config"
        )


def diagnose_run(cfg: Config, run: Path) -> CriticDiagnostics:
    """Load ``run``'s newest checkpoint, diagnose its critic, write the results into ``run``; return them."""
    run = Path(run)
    check_run_config(cfg, run)
    sim = Simulator(cfg)
    w = sim.world
    # the fixed stages' weights are buffers in the checkpoint: the placeholder is overwritten on load
    # it never updates, so it compiles nothing (and needs no C++ compiler) whatever the run trained with
    eager = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})})
    device = torch.device(cfg.device)  # where the simulator's world is: the networks act on its tensors
    agent = CascadeAgent(
        eager, w.n_users, w.n_items, w.n_categories, torch.zeros(sum(cfg.cascade.action_dims))
    ).to(device)
    knots = (
        torch.zeros(len(cfg.world.user_types), n_item_groups(cfg), cfg.features.cqr_knots, device=device)
        if cfg.algo.cqr
        else None
    )
    restored = Checkpoints(run / "checkpoints", Context(device=device), read_only=True).restore(
        agent, None, knots, torch.Generator()
    )
    if restored is None:
        raise FileNotFoundError(f"{run}: no complete checkpoint under {run / 'checkpoints'}")
    result = diagnose(agent.eval(), sim, agent.actors, knots)
    groups = [t.name for t in cfg.world.user_types]
    atomic_write_text(run / "diagnostics.json", result.model_dump_json(indent=2))
    atomic_write_text(run / "diagnostics.md", diagnostics_markdown(result, groups) + "\n")
    plot_diagnostics(result, weight_names(cfg), groups, run / "diagnostics.png")
    return result
