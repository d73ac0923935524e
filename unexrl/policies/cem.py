"""Cross-entropy method over fixed fusion weights: the paper's production baseline, and our oracles.

Each iteration samples a population of weight vectors around a Gaussian, scores every candidate by mean session
watch time on the same sessions (common random numbers), and refits the Gaussian to the elite. With groups, a
candidate holds one vector per group and each group's elite is chosen on that group's sessions only, so one
batched rollout tunes every group at once.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm.auto import tqdm

from unexrl.config import CascadeConfig, CEMConfig
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import WeightPolicy
from unexrl.sim.env import Simulator
from unexrl.sim.hashing import hash_key

log = logging.getLogger(__name__)


def tune_cem(
    sim: Simulator,
    cem: CEMConfig,
    seeds: tuple[int, ...],
    init: Tensor | None = None,
    free: Tensor | None = None,
    group_by: str = "none",
    progress: bool = True,
    label: str = "cem",
) -> WeightPolicy:
    """Tune weights by CEM on rollouts of ``seeds`` (training seeds only).

    init: [G, D] starting mean (default zeros; G = number of groups). free: [D] bool, dims CEM may change
    (others stay at ``init``). group_by: "none", "activity_group" or "oracle_type".
    """
    cascade: CascadeConfig = sim.cfg.cascade
    n_groups = 1 if group_by == "none" else len(sim.cfg.world.user_types)
    dim = sum(cascade.action_dims)
    mean = torch.zeros(n_groups, dim) if init is None else init.clone().float().expand(n_groups, dim).clone()
    free = torch.ones(dim, dtype=torch.bool) if free is None else free
    std = torch.full((n_groups, dim), cem.init_std) * free
    n_elite = max(2, round(cem.elite_fraction * cem.population))
    m = cem.sessions_per_candidate * n_groups  # each group's elite is judged on about the same number
    generator = torch.Generator().manual_seed(int(hash_key(*seeds, len(label)).item()) % (2**31))
    for it in tqdm(range(cem.iterations), desc=label, disable=not progress, leave=False):
        seed = seeds[it % len(seeds)] * 1000 + it
        pop = mean + std * torch.randn(cem.population, n_groups, dim, generator=generator)
        pop[0] = mean  # keep the incumbent mean in every population
        pop = pop.clamp(cascade.action_low, cascade.action_high)
        sessions = torch.arange(cem.population * m) % m  # every candidate sees the same m sessions
        users = sim.start(seed, sessions).user.cpu()
        group = torch.zeros_like(users) if group_by == "none" else _group_of(sim, group_by, users)
        candidate = torch.arange(cem.population * m) // m
        row_weights = pop[candidate, group].to(sim.world.item_category.device)
        policy = WeightPolicy(row_weights, cascade, group_by="row")
        out = rollout(sim, policy, seed, sessions, batch_size=cem.population * m)
        ret = torch.as_tensor(out.watch_time, dtype=torch.float64)
        for g in range(n_groups):
            rows = group == g
            if not bool(rows.any()):
                continue
            score = torch.zeros(cem.population, dtype=torch.float64).index_add_(0, candidate[rows], ret[rows])
            elite = pop[score.topk(n_elite).indices, g]
            mean[g] = elite.mean(0)
            std[g] = elite.std(0).clamp_min(cem.min_std) * free
        log.debug("%s iteration %d: best %.1f s", label, it, float(ret.view(cem.population, m).mean(1).max()))
    return WeightPolicy(mean.to(sim.world.item_category.device), cascade, group_by=group_by)  # type: ignore[arg-type]


def _group_of(sim: Simulator, group_by: str, users: Tensor) -> Tensor:
    if group_by == "oracle_type":
        return sim.world.user_type[users.to(sim.world.user_type.device)].cpu()
    if group_by == "activity_group":
        return sim.world.user_activity_group[users.to(sim.world.user_type.device)].cpu()
    raise ValueError(f"group_by must be none, activity_group or oracle_type, got {group_by!r}")
