"""`unexrl bench train`: transitions/s of one update step, against references measured in the same run.

- unexrl-cic: one UNEX-RL-CIC update (CIC replay for the critic target with the target actors, the critic on the
  replayed tau^{1:N}, every actor through CIC, twin critics), on one fixed batch;
- unexrl-ctde: the same networks and batch with the logged downstream observations: their ratio is CIC's cost;
- raw EBC: forward + backward of a TorchRec EmbeddingBagCollection with the same three tables (users, items,
  categories) on the same KeyedJaggedTensor batch: the floor an embedding-bound step is held against. One update
  runs the sparse encoders of every actor, critic and target, so the ratio says how many such passes it costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torchrec import EmbeddingBagCollection

from unexrl.bench.sim import _median_seconds
from unexrl.config import Config
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.rl.agent import CascadeAgent
from unexrl.rl.networks import embedding_tables
from unexrl.rl.observation import sparse_features
from unexrl.rl.replay import ReplayBuffer
from unexrl.sim.env import Simulator, Step
from unexrl.train.loop import on_device


def bench_train(cfg: Config) -> dict[str, Any]:
    """Measure update throughput of CIC and CTDE and the raw EBC reference on one batch; JSON-able."""
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    sim = Simulator(cfg)
    w = sim.world
    cem = torch.full((1, sum(cfg.cascade.action_dims)), 0.5)
    steps: list[Step] = []
    policy = GaussianExploration(WeightPolicy(cem.to(device), cfg.cascade), cfg.algo.exploration_std, seed=1)
    rollout(sim, policy, cfg.seeds.train[0], 256, 256, on_step=steps.append)
    buffer = ReplayBuffer(cfg, 100_000)
    buffer.add_steps(steps, w)
    batch = on_device(buffer.sample(cfg.algo.batch_size, torch.Generator().manual_seed(0)), device)
    repeats = cfg.bench.repeats

    seconds = {}
    for name in ("unexrl-cic", "unexrl-ctde"):
        algo_cfg = cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"name": name, "policy_delay": 1})})
        agent = CascadeAgent(algo_cfg, w.n_users, w.n_items, w.n_categories, cem).to(device)
        seconds[name] = _median_seconds(lambda agent=agent: agent.update(batch), repeats, device)

    ebc = EmbeddingBagCollection(
        tables=embedding_tables("bench", w.n_users, w.n_items, w.n_categories, cfg.algo.embedding_dim), device=device
    )
    kjt = sparse_features(batch.tau).to(device)

    def raw_step() -> None:
        kt = ebc(kjt)
        kt.values().sum().backward()

    seconds["raw_ebc"] = _median_seconds(raw_step, repeats, device)
    tps = {k: cfg.algo.batch_size / v for k, v in seconds.items()}
    return {
        "config": cfg.name,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch": cfg.algo.batch_size,
        "tables": {"users": w.n_users, "items": w.n_items, "categories": w.n_categories, "dim": cfg.algo.embedding_dim},
        "transitions_per_s": {k: round(v, 1) for k, v in tps.items()},
        "ratios": {
            "cic_vs_ctde": tps["unexrl-cic"] / tps["unexrl-ctde"],
            "cic_update_vs_raw_ebc": tps["unexrl-cic"] / tps["raw_ebc"],
            "ctde_update_vs_raw_ebc": tps["unexrl-ctde"] / tps["raw_ebc"],
        },
    }


def format_bench_train(result: dict[str, Any]) -> str:
    lines = [(f"bench train: config {result['config']}, batch {result['batch']}, {result['device']} "
              f"({result['torch_threads']} threads)")]
    for name, value in result["transitions_per_s"].items():
        lines.append(f"  {name:14s} {value:12,.0f} transitions/s")
    for name, value in result["ratios"].items():
        lines.append(f"  {name:24s} {value:6.3f}")
    return "\n".join(lines)

