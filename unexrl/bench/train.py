"""`unexrl bench train`: transitions/s of one update step, against references measured in the same run.

- unexrl-cic: one UNEX-RL-CIC update with an actor step in every update (``policy_delay=1`` and ``actor_start=0``:
  the n-step target from the target critics' state values, the twin centred critics around the CIC actions, every
  actor through CIC, the target update), on one fixed batch, in one process with the tables stepped by row-wise
  Adagrad, as `unexrl train` runs it once the actors have started;
- unexrl-cic-critic: the same update before the actors start (``actor_start`` beyond the run: the critic step and
  the target update alone), what `unexrl train` runs during its critic-only warm-up;
- unexrl-cic-compiled: the unexrl-cic update with ``train.compile`` (its dense regions compiled by inductor); the
  seconds its first call takes to compile are reported beside it, since a run pays them once (without a C++
  compiler it is left out, and ``not_measured`` says why);
- unexrl-ctde: the unexrl-cic update with the logged downstream observations: their ratio is CIC's cost;
- raw EBC: forward + backward of a plain TorchRec EmbeddingBagCollection with the same three tables (users, items,
  categories) on the same batch's KeyedJaggedTensor, no optimizer step: the floor an embedding-bound step is held
  against.

Each is measured at ``algo.batch_size`` and at ``bench.large_batch``, all in interleaved rounds (one call of
each per round, unexrl/bench/timing.py), so that the ratios compare calls made under the same load. Every update's
output says whether it took an actor step; the share is reported, so a setting that keeps the actors still (as
``actor_start`` once did, unnoticed, from 2026-12-01 to 2026-12-06) shows in the result instead of flattering it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torchrec import EmbeddingBagCollection

from unexrl.bench.timing import interleaved_median_seconds
from unexrl.config import Config
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.rl.agent import CascadeAgent, require_cpp_compiler
from unexrl.rl.networks import embedding_tables
from unexrl.rl.observation import SPARSE_FEATURES, sparse_features
from unexrl.rl.replay import ReplayBuffer
from unexrl.sim.env import Simulator, Step
from unexrl.sim.world import World


def bench_replay(cfg: Config) -> tuple[ReplayBuffer, World]:
    """The transitions every candidate updates on, and their world: 256 sessions of CEM-like weights (0.5) with
    exploration on the first training seed, in the replay buffer `unexrl train` samples from."""
    sim = Simulator(cfg)
    cem = torch.full((1, sum(cfg.cascade.action_dims)), 0.5)
    steps: list[Step] = []
    policy = GaussianExploration(
        WeightPolicy(cem.to(cfg.device), cfg.cascade), cfg.algo.exploration_std, seed=1
    )
    rollout(sim, policy, cfg.seeds.train[0], 256, 256, on_step=steps.append)
    buffer = ReplayBuffer(cfg, 100_000)
    buffer.add_steps(steps, sim.world)
    return buffer, sim.world


def bench_agent(
    cfg: Config,
    world: World,
    buffer: ReplayBuffer,
    generator: torch.Generator,
    algo: str,
    actor_start: int,
    compiled: bool,
) -> CascadeAgent:
    """An agent that takes ``algo``'s update with its actor step in every update from ``actor_start`` on
    (``policy_delay=1``), its tables stepped by row-wise Adagrad in this process, its inputs standardised on the
    replay's first 4,096 samples."""
    device = torch.device(cfg.device)
    algo_cfg = cfg.model_copy(
        update={
            "algo": cfg.algo.model_copy(update={"name": algo, "policy_delay": 1, "actor_start": actor_start}),
            "train": cfg.train.model_copy(update={"compile": compiled}),
        }
    )
    agent = CascadeAgent(
        algo_cfg,
        world.n_users,
        world.n_items,
        world.n_categories,
        torch.full((1, sum(cfg.cascade.action_dims)), 0.5),
        embedding_lr=cfg.train.embedding_lr,
    ).to(device)
    agent.fit_standardizers(buffer.sample(4096, generator).to(device))
    return agent


def bench_train(cfg: Config) -> dict[str, Any]:
    """Measure update throughput of CIC (with and without its actor step) and CTDE and the raw EBC reference at two
    batch sizes; JSON-able."""
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    buffer, w = bench_replay(cfg)
    rows = {"users": w.n_users, "items": w.n_items, "categories": w.n_categories}
    generator = torch.Generator().manual_seed(0)
    repeats = cfg.bench.repeats
    ebc = EmbeddingBagCollection(
        tables=embedding_tables("bench", SPARSE_FEATURES, rows, cfg.algo.embedding_dim), device=device
    )
    variants = [
        ("unexrl-cic", "unexrl-cic", 0, False),
        ("unexrl-cic-critic", "unexrl-cic", 10**9, False),
        ("unexrl-cic-compiled", "unexrl-cic", 0, True),
        ("unexrl-ctde", "unexrl-ctde", 0, False),
    ]
    not_measured: dict[str, str] = {}
    try:
        require_cpp_compiler()
    except RuntimeError as err:  # the eager candidates still say what they measure
        not_measured["unexrl-cic-compiled"] = str(err)
    agents = {
        name: bench_agent(cfg, w, buffer, generator, algo, actor_start, compiled)
        for name, algo, actor_start, compiled in variants
        if name not in not_measured
    }

    per_batch = {}
    actor_steps: dict[str, list[bool]] = {name: [] for name in agents}
    compile_seconds = {}
    for size in (cfg.algo.batch_size, cfg.bench.large_batch):
        batch = buffer.sample(size, generator).to(device)
        kjt = sparse_features(batch.tau).to(device)
        if "unexrl-cic-compiled" in agents:
            start = time.perf_counter()
            agents["unexrl-cic-compiled"].update(batch)  # compiles for this batch size
            compile_seconds[size] = time.perf_counter() - start
        candidates: dict[str, Callable[[], Any]] = {
            name: lambda agent=agent, batch=batch, steps=actor_steps[name]: steps.append(
                "actor_loss" in agent.update(batch)
            )
            for name, agent in agents.items()
        }
        candidates["raw_ebc"] = lambda kjt=kjt: ebc(kjt).values().sum().backward()
        seconds = interleaved_median_seconds(candidates, repeats, device)
        per_batch[size] = {k: size / v for k, v in seconds.items()}
    tps = per_batch[cfg.algo.batch_size]
    ratios = {
        "cic_vs_ctde": tps["unexrl-cic"] / tps["unexrl-ctde"],
        "cic_update_vs_raw_ebc": tps["unexrl-cic"] / tps["raw_ebc"],
        "cic_critic_step_vs_raw_ebc": tps["unexrl-cic-critic"] / tps["raw_ebc"],
        "ctde_update_vs_raw_ebc": tps["unexrl-ctde"] / tps["raw_ebc"],
        "cic_update_vs_raw_ebc_large_batch": (
            per_batch[cfg.bench.large_batch]["unexrl-cic"] / per_batch[cfg.bench.large_batch]["raw_ebc"]
        ),
    }
    if "unexrl-cic-compiled" in tps:
        ratios["cic_compiled_update_vs_raw_ebc"] = tps["unexrl-cic-compiled"] / tps["raw_ebc"]
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
        "actor_step_share": {name: sum(steps) / len(steps) for name, steps in actor_steps.items()},
        "compile_seconds": {size: round(v, 1) for size, v in compile_seconds.items()},
        "not_measured": not_measured,
        "ratios": ratios,
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
        share = result["actor_step_share"].get(name)
        actors = "" if share is None else f"  actor step in {share:.0%} of updates"
        lines.append(
            f"  {name:18s} {value:12,.0f} transitions/s  (batch {result['large_batch']}: {large:12,.0f}){actors}"
        )
    if result["compile_seconds"]:
        compile_seconds = ", ".join(f"{s:.0f} s at batch {b}" for b, s in result["compile_seconds"].items())
        lines.append(f"  unexrl-cic-compiled compiled in {compile_seconds}")
    for name, why in result["not_measured"].items():
        lines.append(f"  {name}: not measured: {why}")
    for name, value in result["ratios"].items():
        lines.append(f"  {name:34s} {value:6.3f}")
    return "\n".join(lines)
