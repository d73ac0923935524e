"""CIC replays the simulator exactly, SG cuts exactly the gradient paths it should, the actor step is the spec's
per-stage losses, the critic's slope is its action gradient, CQR is uniform on held data."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from unexrl.cascade import replay_actions, run_cascade
from unexrl.config import Config
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import WeightPolicy
from unexrl.rl.agent import FIRST, CascadeAgent
from unexrl.rl.cic import cascade_with_actors
from unexrl.rl.cqr import cqr_transform, fit_cqr_knots
from unexrl.rl.observation import sparse_features, tau1_from_observation
from unexrl.rl.policy import ActorPolicy
from unexrl.rl.replay import Batch, ReplayBuffer
from unexrl.sim.env import Simulator, Step
from unexrl.train.loop import train

SMALL_NETS = ["algo.hidden=32", "algo.embedding_dim=4", "algo.batch_size=64"]


def _agent(cfg: Config, sim: Simulator, **algo: object) -> CascadeAgent:
    cfg = cfg.model_copy(
        update={"algo": cfg.algo.model_copy(update={"hidden": 32, "embedding_dim": 4, **algo})}
    )
    torch.manual_seed(0)
    w = sim.world
    return CascadeAgent(
        cfg, w.n_users, w.n_items, w.n_categories, torch.full((1, sum(cfg.cascade.action_dims)), 0.5)
    )


@pytest.fixture(scope="module")
def collected(small_cfg: Config, small_sim: Simulator) -> tuple[CascadeAgent, list[Step], ReplayBuffer]:
    agent = _agent(small_cfg, small_sim)
    steps: list[Step] = []
    rollout(
        small_sim, ActorPolicy(agent.actors, small_cfg, small_sim.world), 1000, 64, 64, on_step=steps.append
    )
    buffer = ReplayBuffer(small_cfg, 10_000)
    buffer.add_steps(steps, small_sim.world)
    return agent, steps, buffer


def test_cic_replay_equals_the_simulator(small_cfg: Config, small_sim: Simulator, collected) -> None:  # type: ignore[no-untyped-def]
    """CIC with the same actors on the stored tau^1 rebuilds every stage's candidates and actions."""
    agent, steps, _ = collected
    with torch.no_grad():
        for step in steps:
            tau = tau1_from_observation(step.obs, small_sim.world, small_cfg)
            embedding = agent.actors.embed(sparse_features(tau))
            out, actions, _ = cascade_with_actors(
                tau, embedding, small_sim.keep, agent.actors, stop_gradient=True
            )
            for logged, again in zip(step.cascade.candidates, out.candidates):
                assert torch.equal(logged, again)
            for logged, again in zip(step.cascade.actions, actions):
                assert torch.equal(logged, again)


def test_ctde_actors_see_the_logged_observation_whole(small_cfg: Config, collected) -> None:  # type: ignore[no-untyped-def]
    """Under CTDE the logged actions select each stage's candidates, and they are also the upstream actions each
    actor reads: the observation the log holds, not the logged candidates beside the actors' own upstream actions."""
    agent, _, buffer = collected
    batch = buffer.sample(32, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    logged = [(a + 0.2 * torch.randn(a.shape, generator=generator)).clamp(-1, 1) for a in batch.actions]
    seen: list[list[torch.Tensor]] = []
    recording = copy.copy(agent.actors)
    recording.act = lambda stage, embedding, dense, upstream: (  # type: ignore[method-assign]
        seen.append(list(upstream)) or agent.actors.act(stage, embedding, dense, upstream)
    )
    with torch.no_grad():
        embedding = agent.actors.embed(sparse_features(batch.tau))
        _, actions, _ = cascade_with_actors(
            batch.tau,
            embedding,
            [s.keep for s in small_cfg.cascade.stages],
            recording,
            stop_gradient=True,
            select_with=logged,
        )
    for stage, upstream in enumerate(seen):
        assert all(torch.equal(a, b) for a, b in zip(upstream, logged[:stage], strict=True))
    assert not torch.equal(actions[0], logged[0])  # the actors' own, recorded beside them


def test_buffer_replay_equals_the_simulator(collected) -> None:  # type: ignore[no-untyped-def]
    """From the replay buffer (float16 predictions), replaying the logged actions gives the logged pages."""
    _, steps, buffer = collected
    pages = torch.cat([s.cascade.page[s.active] for s in steps])
    idx = torch.arange(buffer.size)
    tau = buffer.tau(idx)
    out = run_cascade(
        tau.predictions,
        [s.keep for s in buffer.cfg.cascade.stages],
        replay_actions([a[idx] for a in buffer.actions]),
    )
    assert torch.equal(out.page, pages)
    # every non-final transition links to the same session's next request
    nxt = buffer.next_index[idx]
    linked = ~buffer.done[idx]
    assert bool((buffer.user[nxt[linked]] == buffer.user[idx[linked]]).all())
    assert bool((buffer.state[nxt[linked], 0] > buffer.state[idx[linked], 0]).all())


def _head_grads(agent: CascadeAgent) -> list[bool]:
    """Which stage heads a backward pass reached."""
    return [
        any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in head.parameters())
        for head in agent.actors.heads
    ]


def _trained(agent: CascadeAgent) -> CascadeAgent:
    """Actors that have moved off their initial weights: a fresh head's last layer is zero, so no gradient
    passes through its inputs yet."""
    with torch.no_grad():
        for head in agent.actors.heads:
            if hasattr(head, "net"):
                head.net[-1].weight.normal_(0, 0.1)
    return agent


def _stage_losses(agent: CascadeAgent, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The spec's L_i = -Q_1(tau, sg(a^{<i}), mu^i, sg(a^{>i})), one critic evaluation per stage, written out, and
    mean |Q_1| at the actors' actions (the actor step's scale)."""
    kjt = sparse_features(batch.tau)
    actions, _ = agent.policy_actions(batch, agent.actors.embed(kjt))
    critic = agent.critics[0]
    dense = torch.cat([batch.tau.state, batch.first_summary], dim=1)
    features = critic.head.state_features(critic.encoder(kjt).detach(), dense, FIRST).detach()
    centre = [a.detach() for a in actions]
    losses = [
        -critic.head(features, [a if j == i else a.detach() for j, a in enumerate(actions)], centre)[0].mean()
        for i in range(len(actions))
    ]
    return losses, critic.head.value(features).abs().mean()


@pytest.mark.parametrize("sg", [True, False])
def test_stopping_gradient(small_cfg: Config, small_sim: Simulator, collected, sg: bool) -> None:  # type: ignore[no-untyped-def]
    _, _, buffer = collected
    agent = _trained(_agent(small_cfg, small_sim, sg=sg))
    agent.fit_standardizers(buffer.sample(512, torch.Generator().manual_seed(1)))
    batch = buffer.sample(64, torch.Generator().manual_seed(0))
    n = len(agent.actors.heads)
    for i in range(n):
        agent.zero_grad(set_to_none=True)
        _stage_losses(agent, batch)[0][i].backward()
        reached = _head_grads(agent)
        if sg:
            assert reached == [j == i for j in range(n)], f"SG on: actor {i}'s loss must reach only actor {i}"
        else:
            assert reached == [j <= i for j in range(n)], f"SG off: actor {i}'s loss must reach actors 0..{i}"


@pytest.mark.parametrize("sg", [True, False])
def test_the_actor_step_is_the_sum_of_the_stage_losses(
    small_cfg: Config,
    small_sim: Simulator,
    collected,  # type: ignore[no-untyped-def]
    sg: bool,
) -> None:
    """The update's single Q_1 evaluation has the gradient of sum_i L_i, with and without SG (proximal term off:
    it is added beside the L_i)."""
    _, _, buffer = collected
    agent = _trained(_agent(small_cfg, small_sim, sg=sg, proximal=0.0))
    agent.fit_standardizers(buffer.sample(512, torch.Generator().manual_seed(1)))
    batch = buffer.sample(64, torch.Generator().manual_seed(0))
    heads = [p for head in agent.actors.heads for p in head.parameters()]

    def gradient(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, heads, allow_unused=True, retain_graph=True))

    kjt = sparse_features(batch.tau)
    actions, summaries = agent.policy_actions(batch, agent.actors.embed(kjt))
    critic_embedding = [agent.critics[0].encoder(kjt).detach()]
    # actor_loss divides Q_1 by its batch mean magnitude; the stage losses share that one constant
    fused = agent.actor_loss(batch, actions, summaries, critic_embedding)
    losses, scale = _stage_losses(agent, batch)
    written_out = gradient(sum(losses) / scale)
    for a, b in zip(gradient(fused), written_out):
        assert (a is None) == (b is None) or bool((a if a is not None else b).abs().sum() == 0)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_critics_action_gradient_is_its_slope(small_cfg: Config, small_sim: Simulator, collected) -> None:  # type: ignore[no-untyped-def]
    """dQ/da at the policy's own action is g(s) / sigma: what the actors ascend and the diagnostics compare."""
    _, _, buffer = collected
    agent = _agent(small_cfg, small_sim)
    agent.fit_standardizers(buffer.sample(512, torch.Generator().manual_seed(1)))
    batch = buffer.sample(32, torch.Generator().manual_seed(0))
    kjt = sparse_features(batch.tau)
    head = agent.critics[0].head
    with torch.no_grad():  # a critic with a non-trivial slope and curvature
        for layer in head.net.layers:
            layer.weight.normal_(0, 0.3)
    dense = torch.cat([batch.tau.state, batch.first_summary], dim=1)
    features = head.state_features(agent.critics[0].encoder(kjt), dense, FIRST)
    slope = features[0, :, 1 : 1 + head.action_dim] / head.actions.std
    torch.testing.assert_close(agent.action_gradient(batch), slope, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("unit", ["page", "item"])
def test_cqr_is_uniform_within_cells_on_held_data(small_cfg: Config, small_sim: Simulator, unit: str) -> None:
    cfg = small_cfg.model_copy(update={"features": small_cfg.features.model_copy(update={"cqr_unit": unit})})
    steps: list[Step] = []
    policy = WeightPolicy(torch.full((1, sum(cfg.cascade.action_dims)), 0.5), cfg.cascade)
    rollout(small_sim, policy, 1000, 400, 400, on_step=steps.append)
    buffer = ReplayBuffer(cfg, 20_000)
    buffer.add_steps(steps, small_sim.world)
    watch, user_group, item_group = buffer.cqr_samples()
    shuffled = torch.randperm(watch.numel(), generator=torch.Generator().manual_seed(0))
    watch, user_group, item_group = watch[shuffled], user_group[shuffled], item_group[shuffled]
    half = watch.numel() // 2
    n_item_groups = 1 if unit == "page" else len(cfg.features.duration_bucket_edges_s) + 1
    knots = fit_cqr_knots(watch[:half], user_group[:half], item_group[:half], 3, n_item_groups, 51)
    held = cqr_transform(watch[half:], user_group[half:], item_group[half:], knots)
    assert float(held.min()) >= 0 and float(held.max()) <= 1
    checked = 0
    for g in range(3):
        for h in range(n_item_groups):
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
    cfg = small_cfg.model_copy(
        update={
            "algo": small_cfg.algo.model_copy(
                update={"name": algo, "hidden": 32, "embedding_dim": 4, "batch_size": 32}
            ),
            "train": small_cfg.train.model_copy(
                update={
                    "updates": 6,
                    "warmup_sessions": 16,
                    "sessions_per_collect": 8,
                    "updates_per_collect": 3,
                    "eval_every": 6,
                    "eval_sessions": 8,
                }
            ),
            "diagnostics": small_cfg.diagnostics.model_copy(update={"sessions": 8, "gradient_sessions": 8}),
        }
    )
    result = train(cfg, torch.full((1, sum(cfg.cascade.action_dims)), 0.5), small_sim, progress=False)
    assert result.agent.updates == 6
    point = result.curve[0]
    assert len(result.curve) == 1 and point.validation_watch_time > 0
    assert all(
        math.isfinite(v) for v in point.model_dump(exclude={"diagnostics"}, exclude_none=True).values()
    )
    diagnostics = point.diagnostics  # the critic diagnostics ran at the validation point
    assert diagnostics is not None
    assert (
        math.isfinite(diagnostics.calibration.relative_bias) and -1 <= diagnostics.gradient.cosine.mean <= 1
    )


def test_the_compiled_update_is_the_update(small_cfg: Config, small_sim: Simulator, collected) -> None:  # type: ignore[no-untyped-def]
    """train.compile changes how the update runs, not what it computes: from the same start, on the same batches,
    through critic-only updates and actor steps, the compiled and the eager agent end with the same networks."""
    _, _, buffer = collected
    w = small_sim.world
    agents = []
    for compiled in (False, True):
        cfg = small_cfg.model_copy(
            update={
                "algo": small_cfg.algo.model_copy(
                    update={"hidden": 32, "embedding_dim": 4, "actor_start": 2, "policy_delay": 2}
                ),
                "train": small_cfg.train.model_copy(update={"compile": compiled}),
            }
        )
        torch.manual_seed(0)
        agent = CascadeAgent(
            cfg,
            w.n_users,
            w.n_items,
            w.n_categories,
            torch.full((1, sum(cfg.cascade.action_dims)), 0.5),
            embedding_lr=0.01,
        )
        generator = torch.Generator().manual_seed(0)
        agent.fit_standardizers(buffer.sample(512, generator))
        initial = copy.deepcopy(agent.state_dict())
        torch._dynamo.reset()  # graphs compiled by earlier tests would be reused, and not counted
        torch._dynamo.utils.counters.clear()  # counts only this agent's graphs
        stats = [agent.update(buffer.sample(64, generator)) for _ in range(6)]
        agents.append((agent, stats, initial, torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    (eager, eager_stats, initial, eager_graphs), (compiled, compiled_stats, _, compiled_graphs) = agents
    # the regions: the actors through CIC with and without a graph, the critic loss, the actor loss
    assert (eager_graphs, compiled_graphs) == (0, 4)
    assert [set(s) for s in compiled_stats] == [set(s) for s in eager_stats]  # the same steps were taken
    assert sum("actor_loss" in s for s in eager_stats) == 2
    moved = [
        name for name, p in eager.state_dict().items() if not torch.allclose(p, initial[name], atol=1e-4)
    ]
    assert {"critics.0.head.net.layers.0.weight", "actors.heads.2.net.4.weight"} <= set(moved)
    for (name, p), (_, q) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # a copy of a compiled agent trains its own networks, not the original's
    before = copy.deepcopy(compiled.state_dict())
    clone = copy.deepcopy(compiled)
    clone.update(buffer.sample(64, torch.Generator().manual_seed(1)))
    assert all(torch.equal(p, before[name]) for name, p in compiled.state_dict().items())
    assert not torch.equal(
        clone.critics[0].head.net.layers[0].weight, before["critics.0.head.net.layers.0.weight"]
    )
    torch._dynamo.reset()
