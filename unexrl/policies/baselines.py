"""The fixed-weight baselines every report compares against, tuned on training seeds only.

- cem: global CEM over all stages (the paper's production baseline)
- group-cem: per observable activity group, CEM on every stage from CEM's weights (the lookup table a production
  team would try first; deployable: the group is a feature the actors see too)
- oracle-group-cem-ranking: per hidden user type, CEM on the ranking stage only, upstream fixed at CEM
- oracle-group-cem-all: per hidden user type, CEM on every stage (bounds what fixed per-group weights reach)
- popular-matching: the matching stage ranks by popularity only, later stages re-tuned by CEM (what a weak
  upstream stage leaves the rest of the cascade)
"""

from __future__ import annotations

import torch
from torch import Tensor

from unexrl.config import BASELINES, CascadeConfig
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


_LABELS = {
    "oracle-group-cem-ranking": "oracle ranking-only",
    "oracle-group-cem-all": "oracle all-stages",
    "popular-matching": "popular matching",
}
"""progress labels; a label also seeds its CEM's sampling, so these keep the documented baselines reproducible"""


def tune_baseline(
    name: str, sim: Simulator, cem: WeightPolicy | None = None, progress: bool = True
) -> WeightPolicy:
    """Tune baseline ``name`` on ``cfg.seeds.train``; every one but ``cem`` starts from ``cem`` (tuned when None)."""
    cfg = sim.cfg
    cascade, seeds = cfg.cascade, cfg.seeds.train
    if name == "cem":
        return tune_cem(sim, cfg.cem, seeds, progress=progress, label="cem")
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    start = (cem if cem is not None else tune_baseline("cem", sim, progress=progress)).weights.cpu()
    last = len(cascade.stages) - 1
    if name == "popular-matching":
        return tune_cem(
            sim,
            cfg.cem,
            seeds,
            init=popular_matching_init(cascade, start),
            free=stage_mask(cascade, list(range(1, last + 1))),
            progress=progress,
            label=_LABELS[name],
        )
    group_by = "activity_group" if name == "group-cem" else "oracle_type"
    free = stage_mask(cascade, [last]) if name == "oracle-group-cem-ranking" else None
    return tune_cem(
        sim,
        cfg.cem,
        seeds,
        init=start,
        free=free,
        group_by=group_by,
        progress=progress,
        label=_LABELS.get(name, name),
    )


def tune_baselines(sim: Simulator, progress: bool = True) -> dict[str, WeightPolicy]:
    """Tune every baseline on ``cfg.seeds.train``, CEM first."""
    cem = tune_baseline("cem", sim, progress=progress)
    return {"cem": cem, **{name: tune_baseline(name, sim, cem, progress) for name in BASELINES[1:]}}
