"""CIC replays the simulator exactly, SG cuts exactly the gradient paths it should, CQR is uniform on held data."""

from __future__ import annotations

import pytest
import torch

from unexrl.cascade import replay_actions, run_cascade
from unexrl.config import Config
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import WeightPolicy
from unexrl.rl.agent import CascadeAgent
from unexrl.rl.cic import cascade_with_actors
from unexrl.rl.cqr import cqr_transform, fit_cqr_knots
from unexrl.rl.observation import sparse_features, tau1_from_observation
from unexrl.rl.policy import ActorPolicy
from unexrl.rl.replay import ReplayBuffer
from unexrl.sim.env import Simulator, Step
from unexrl.train.loop import train

SMALL_NETS = ["algo.hidden=32", "algo.embedding_dim=4", "algo.batch_size=64"]


def _agent(cfg: Config, sim: Simulator, **algo: object) -> CascadeAgent:
    cfg = cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"hidden": 32, "embedding_dim": 4, **algo})})
    torch.manual_seed(0)
    w = sim.world
    return CascadeAgent(cfg, w.n_users, w.n_items, w.n_categories, torch.full((1, sum(cfg.cascade.action_dims)), 0.5))


@pytest.fixture(scope="module")
def collected(small_cfg: Config, small_sim: Simulator) -> tuple[CascadeAgent, list[Step], ReplayBuffer]:
    agent = _agent(small_cfg, small_sim)
    steps: list[Step] = []
    rollout(small_sim, ActorPolicy(agent.actors, small_cfg, small_sim.world), 1000, 64, 64, on_step=steps.append)
    buffer = ReplayBuffer(small_cfg, 10_000)
    buffer.add_steps(steps, small_sim.world)
    return agent, steps, buffer


def test_cic_replay_equals_the_simulator(small_cfg: Config, small_sim: Simulator, collected) -> None:  # type: ignore[no-untyped-def]
    """CIC with the same actors on the stored tau^1 rebuilds every stage's candidates and actions."""
    agent, steps, _ = collected
    n_groups = len(small_cfg.world.user_types)
    with torch.no_grad():
        for step in steps:
            tau = tau1_from_observation(step.obs, small_sim.world, small_cfg.session.max_requests, n_groups)
            out, actions, _ = cascade_with_actors(tau, sparse_features(tau), small_sim.keep, agent.actors, stop_gradient=True)
            for logged, again in zip(step.cascade.candidates, out.candidates):
                assert torch.equal(logged, again)
            for logged, again in zip(step.cascade.actions, actions):
                assert torch.equal(logged, again)


def test_buffer_replay_equals_the_simulator(collected) -> None:  # type: ignore[no-untyped-def]
    """From the replay buffer (float16 predictions), replaying the logged actions gives the logged pages."""
    _, steps, buffer = collected
    pages = torch.cat([s.cascade.page[s.active] for s in steps])
    idx = torch.arange(buffer.size)
    tau = buffer.tau(idx)
    out = run_cascade(tau.predictions, [s.keep for s in buffer.cfg.cascade.stages], replay_actions([a[idx] for a in buffer.actions]))
    assert torch.equal(out.page, pages)
    # every non-final transition links to the same session's next request
    nxt = buffer.next_index[idx]
    linked = ~buffer.done[idx]
    assert bool((buffer.user[nxt[linked]] == buffer.user[idx[linked]]).all())
    assert bool((buffer.state[nxt[linked], 0] > buffer.state[idx[linked], 0]).all())


def _grads(agent: CascadeAgent) -> list[bool]:
    return [any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in actor.parameters()) for actor in agent.actors]


@pytest.mark.parametrize("sg", [True, False])
def test_stopping_gradient(small_cfg: Config, small_sim: Simulator, collected, sg: bool) -> None:  # type: ignore[no-untyped-def]
    _, _, buffer = collected
    agent = _agent(small_cfg, small_sim, sg=sg)
    batch = buffer.sample(64, torch.Generator().manual_seed(0))
    kjt = sparse_features(batch.tau)
    n = len(agent.actors)
    for i in range(n):
        agent.zero_grad(set_to_none=True)
        agent.actor_losses(batch, kjt)[i].backward()
        reached = _grads(agent)
        if sg:
            assert reached == [j == i for j in range(n)], f"SG on: actor {i}'s loss must reach only actor {i}"
        else:
            assert reached == [j <= i for j in range(n)], f"SG off: actor {i}'s loss must reach actors 0..{i}"


def test_cqr_is_uniform_within_cells_on_held_data(small_cfg: Config, small_sim: Simulator) -> None:
    steps: list[Step] = []
    policy = WeightPolicy(torch.full((1, sum(small_cfg.cascade.action_dims)), 0.5), small_cfg.cascade)
    rollout(small_sim, policy, 1000, 400, 400, on_step=steps.append)
    buffer = ReplayBuffer(small_cfg, 20_000)
    buffer.add_steps(steps, small_sim.world)
    watch, user_group, item_group = buffer.viewed_items()
    shuffled = torch.randperm(watch.numel(), generator=torch.Generator().manual_seed(0))
    watch, user_group, item_group = watch[shuffled], user_group[shuffled], item_group[shuffled]
    half = watch.numel() // 2
    knots = fit_cqr_knots(watch[:half], user_group[:half], item_group[:half], 3, 5, 51)
    held = cqr_transform(watch[half:], user_group[half:], item_group[half:], knots)
    assert float(held.min()) >= 0 and float(held.max()) <= 1
    checked = 0
    for g in range(3):
        for h in range(5):
            cell = held[(user_group[half:] == g) & (item_group[half:] == h)]
            if cell.numel() < 200:
                continue
            sorted_cell = cell.sort().values
            ecdf = torch.arange(1, cell.numel() + 1) / cell.numel()
            assert float((sorted_cell - ecdf).abs().max()) < 0.12, f"cell ({g}, {h}) is not uniform"
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("algo", ["unexrl-cic", "unexrl-ctde", "td3", "ddpg", "independent-ddpg"])
def test_every_algorithm_trains(small_cfg: Config, small_sim: Simulator, algo: str) -> None:
    cfg = small_cfg.model_copy(update={
        "algo": small_cfg.algo.model_copy(update={"name": algo, "hidden": 32, "embedding_dim": 4, "batch_size": 32}),
        "train": small_cfg.train.model_copy(update={"updates": 6, "warmup_sessions": 16, "sessions_per_collect": 8,
                                                     "updates_per_collect": 3, "eval_every": 6, "eval_sessions": 8}),
    })
    result = train(cfg, torch.full((1, sum(cfg.cascade.action_dims)), 0.5), small_sim, progress=False)
    assert result.agent.updates == 6
    assert len(result.curve) == 1 and result.curve[0]["validation_watch_time"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in result.curve[0].values())
