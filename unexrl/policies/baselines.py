"""The fixed-weight baselines every report compares against, tuned on training seeds only.

- cem: global CEM over all stages (the paper's production baseline)
- oracle-group-cem-ranking: per hidden user type, CEM on the ranking stage only, upstream fixed at CEM
- oracle-group-cem-all: per hidden user type, CEM on every stage (bounds what fixed per-group weights reach)
- popular-matching: the matching stage ranks by popularity only, later stages re-tuned by CEM (what a weak
  upstream stage leaves the rest of the cascade)
"""

from __future__ import annotations

import torch
from torch import Tensor

from unexrl.config import CascadeConfig
from unexrl.policies.cem import tune_cem
from unexrl.policies.weights import WeightPolicy, stage_slices
from unexrl.sim.env import Simulator


def stage_mask(cascade: CascadeConfig, stages: list[int]) -> Tensor:
    """[sum d] bool: the action dims of the given stages."""
    mask = torch.zeros(sum(cascade.action_dims), dtype=torch.bool)
    for i, part in enumerate(stage_slices(cascade)):
        if i in stages:
            mask[part] = True
    return mask


def popular_matching_init(cascade: CascadeConfig, base: Tensor) -> Tensor:
    """``base`` with the matching stage's action replaced by popularity only."""
    heads = cascade.stages[0].heads
    if "popularity" not in heads:
        raise ValueError("the matching stage has no popularity head to rank by")
    out = base.clone()
    first = stage_slices(cascade)[0]
    out[:, first] = 0.0
    out[:, first.start + heads.index("popularity")] = cascade.action_high
    return out


def tune_baselines(sim: Simulator, progress: bool = True) -> dict[str, WeightPolicy]:
    """Tune CEM, the two per-type oracles and the popular-matching cascade on ``cfg.seeds.train``."""
    cfg = sim.cfg
    cascade = cfg.cascade
    seeds = cfg.seeds.train
    last = len(cascade.stages) - 1
    cem = tune_cem(sim, cfg.cem, seeds, progress=progress, label="cem")
    out = {"cem": cem}
    out["oracle-group-cem-ranking"] = tune_cem(
        sim, cfg.cem, seeds, init=cem.weights.cpu(), free=stage_mask(cascade, [last]), group_by="oracle_type",
        progress=progress, label="oracle ranking-only",
    )
    out["oracle-group-cem-all"] = tune_cem(
        sim, cfg.cem, seeds, init=cem.weights.cpu(), group_by="oracle_type", progress=progress, label="oracle all-stages"
    )
    out["popular-matching"] = tune_cem(
        sim, cfg.cem, seeds, init=popular_matching_init(cascade, cem.weights.cpu()),
        free=stage_mask(cascade, list(range(1, last + 1))), progress=progress, label="popular matching",
    )
    return out
