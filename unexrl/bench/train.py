"""`unexrl bench train`: transitions/s of one update step, against references measured in the same run.

- unexrl-cic: one UNEX-RL-CIC update with an actor step in every update (``policy_delay=1``: the n-step target
  from the target critics' state values, the twin centred critics around the CIC actions, every actor through CIC,
  the target update), on one fixed batch, in one process with sparse-gradient tables stepped by row-wise Adagrad,
  as `unexrl train` runs it;
- unexrl-ctde: the same networks and batch with the logged downstream observations: their ratio is CIC's cost;
- raw EBC: forward + backward of a plain TorchRec EmbeddingBagCollection with the same three tables (users, items,
  categories) on the same batch's KeyedJaggedTensor, no optimizer step: the floor an embedding-bound step is held
  against.

Each is measured at ``algo.batch_size`` and at ``bench.large_batch``, the three in interleaved rounds (one call of
each per round, unexrl/bench/timing.py), so that the ratios compare calls made under the same load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchrec import EmbeddingBagCollection

from unexrl.bench.timing import interleaved_median_seconds
from unexrl.config import Config
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.rl.agent import CascadeAgent
from unexrl.rl.networks import embedding_tables
from unexrl.rl.observation import SPARSE_FEATURES, sparse_features
from unexrl.rl.replay import ReplayBuffer
from unexrl.sim.env import Simulator, Step


def bench_train(cfg: Config) -> dict[str, Any]:
    """Measure update throughput of CIC and CTDE and the raw EBC reference at two batch sizes; JSON-able."""
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    sim = Simulator(cfg)
    w = sim.world
    rows = {"users": w.n_users, "items": w.n_items, "categories": w.n_categories}
    cem = torch.full((1, sum(cfg.cascade.action_dims)), 0.5)
    steps: list[Step] = []
    policy = GaussianExploration(WeightPolicy(cem.to(device), cfg.cascade), cfg.algo.exploration_std, seed=1)
    rollout(sim, policy, cfg.seeds.train[0], 256, 256, on_step=steps.append)
    buffer = ReplayBuffer(cfg, 100_000)
    buffer.add_steps(steps, w)
    generator = torch.Generator().manual_seed(0)
    repeats = cfg.bench.repeats
    ebc = EmbeddingBagCollection(
        tables=embedding_tables("bench", SPARSE_FEATURES, rows, cfg.algo.embedding_dim), device=device
    )
    agents = {}
    for name in ("unexrl-cic", "unexrl-ctde"):
        algo_cfg = cfg.model_copy(
            update={"algo": cfg.algo.model_copy(update={"name": name, "policy_delay": 1})}
        )
        agents[name] = CascadeAgent(
            algo_cfg, w.n_users, w.n_items, w.n_categories, cem, embedding_lr=cfg.train.embedding_lr
        ).to(device)
        agents[name].fit_standardizers(buffer.sample(4096, generator).to(device))

    per_batch = {}
    for size in (cfg.algo.batch_size, cfg.bench.large_batch):
        batch = buffer.sample(size, generator).to(device)
        kjt = sparse_features(batch.tau).to(device)
        candidates: dict[str, Callable[[], Any]] = {
            name: lambda agent=agent, batch=batch: agent.update(batch) for name, agent in agents.items()
        }
        candidates["raw_ebc"] = lambda kjt=kjt: ebc(kjt).values().sum().backward()
        seconds = interleaved_median_seconds(candidates, repeats, device)
        per_batch[size] = {k: size / v for k, v in seconds.items()}
    tps = per_batch[cfg.algo.batch_size]
    return {
        "config": cfg.name,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch": cfg.algo.batch_size,
        "large_batch": cfg.bench.large_batch,
        "tables": {**rows, "dim": cfg.algo.embedding_dim},
        "transitions_per_s": {k: round(v, 1) for k, v in tps.items()},
        "transitions_per_s_large_batch": {
            k: round(v, 1) for k, v in per_batch[cfg.bench.large_batch].items()
        },
        "ratios": {
            "cic_vs_ctde": tps["unexrl-cic"] / tps["unexrl-ctde"],
            "cic_update_vs_raw_ebc": tps["unexrl-cic"] / tps["raw_ebc"],
            "ctde_update_vs_raw_ebc": tps["unexrl-ctde"] / tps["raw_ebc"],
            "cic_update_vs_raw_ebc_large_batch": (
                per_batch[cfg.bench.large_batch]["unexrl-cic"] / per_batch[cfg.bench.large_batch]["raw_ebc"]
            ),
        },
    }


def format_bench_train(result: dict[str, Any]) -> str:
    lines = [
        (
            f"bench train: config {result['config']}, batch {result['batch']}, {result['device']} "
            f"({result['torch_threads']} threads)"
        )
    ]
    for name, value in result["transitions_per_s"].items():
        large = result["transitions_per_s_large_batch"][name]
        lines.append(
            f"  {name:14s} {value:12,.0f} transitions/s  (batch {result['large_batch']}: {large:12,.0f})"
        )
    for name, value in result["ratios"].items():
        lines.append(f"  {name:24s} {value:6.3f}")
    return "\n".join(lines)
