"""UNEX-RL-CIC learns: on configs/small.yaml it beats CEM on the evaluation seeds by a paired confidence interval
(fixed seeds; the same training schedule as the experiment, scaled down in small.yaml)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from unexrl.config import Config
from unexrl.evaluate.rollout import rollout
from unexrl.evaluate.stats import bootstrap_uplift
from unexrl.policies.cem import tune_cem
from unexrl.rl.policy import ActorPolicy
from unexrl.sim.env import Simulator
from unexrl.train.loop import train


def test_unexrl_cic_beats_cem(
    small_cfg: Config, small_sim: Simulator, single_thread: Callable[[], AbstractContextManager[None]]
) -> None:
    cfg = small_cfg.model_copy(
        update={"diagnostics": small_cfg.diagnostics.model_copy(update={"during_training": False})}
    )
    with single_thread():
        torch.manual_seed(0)
        cem = tune_cem(small_sim, cfg.cem, cfg.seeds.train, progress=False)
        result = train(cfg, cem.weights, small_sim, progress=False)
        actors, _ = result.selected(
            cfg.train.select
        )  # model selection on seeds.validation, as the experiment does
        assert actors is not None
        learned = ActorPolicy(actors, cfg, small_sim.world)
        n = cfg.evaluation.sessions_per_seed
        candidate = [rollout(small_sim, learned, s, n, n).watch_time for s in cfg.seeds.evaluation]
        reference = [rollout(small_sim, cem, s, n, n).watch_time for s in cfg.seeds.evaluation]
    uplift = bootstrap_uplift(candidate, reference, cfg.evaluation.bootstrap)
    assert uplift.low > 0, f"unexrl-cic vs CEM: {uplift.fmt()}%"
