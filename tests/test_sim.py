"""The simulator is deterministic, batch-size invariant, and replays exactly through the cascade function."""

from __future__ import annotations

import numpy as np
import torch

from unexrl.cascade import replay_actions, run_cascade
from unexrl.config import Config, load_config
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.sim.env import Simulator, Step


def _policy(cfg: Config) -> GaussianExploration:
    base = WeightPolicy(torch.full((1, sum(cfg.cascade.action_dims)), 0.5), cfg.cascade)
    return GaussianExploration(base, std=0.3, seed=1)


def test_rollout_is_deterministic_and_batch_size_invariant(small_cfg: Config, small_sim: Simulator) -> None:
    a = rollout(small_sim, _policy(small_cfg), seed=1000, sessions=90, batch_size=90)
    b = rollout(small_sim, _policy(small_cfg), seed=1000, sessions=90, batch_size=90)
    c = rollout(small_sim, _policy(small_cfg), seed=1000, sessions=90, batch_size=13)
    fresh = rollout(Simulator(small_cfg), _policy(small_cfg), seed=1000, sessions=90, batch_size=90)
    for other in (b, fresh):
        np.testing.assert_array_equal(a.user, other.user)
        np.testing.assert_array_equal(a.watch_time, other.watch_time)
        np.testing.assert_array_equal(a.requests, other.requests)
    # another batch size: the same sessions, users, lengths and selections; float sums may differ in the last bit
    np.testing.assert_array_equal(a.user, c.user)
    np.testing.assert_array_equal(a.requests, c.requests)
    np.testing.assert_array_equal(a.items, c.items)
    np.testing.assert_allclose(a.watch_time, c.watch_time, rtol=1e-6)
    d = rollout(small_sim, _policy(small_cfg), seed=1001, sessions=90, batch_size=90)
    assert not np.array_equal(a.watch_time, d.watch_time)


def test_world_depends_only_on_world_seed(small_cfg: Config) -> None:
    w1 = Simulator(small_cfg).world
    w2 = Simulator(
        load_config(
            None,
            [
                f"{k}={v}"
                for k, v in [("world.n_users", 600), ("world.n_items", 6000), ("world.n_categories", 12)]
            ],
        )
    ).world
    assert torch.equal(w1.item_quality, w2.item_quality)
    w3 = Simulator(
        small_cfg.model_copy(update={"seeds": small_cfg.seeds.model_copy(update={"world": 1})})
    ).world
    assert not torch.equal(w1.item_quality, w3.item_quality)


def test_pools_are_distinct_valid_items(small_cfg: Config, small_sim: Simulator) -> None:
    state = small_sim.start(1000, torch.arange(200))
    obs = small_sim.observe(state)
    pool = obs.pool
    assert pool.shape == (200, small_cfg.cascade.pool_size)
    assert int(pool.min()) >= 0 and int(pool.max()) < small_sim.world.n_items
    assert bool((pool[:, 1:] != pool[:, :-1]).all()), "pools must hold distinct items"
    for pred, stage in zip(obs.predictions, small_cfg.cascade.stages):
        assert pred.shape == (200, small_cfg.cascade.pool_size, len(stage.heads))
        assert torch.equal(pred, pred.half().float()), "predictions must be float16-exact for lossless logs"


def test_stage_models_get_more_accurate_downstream(small_cfg: Config, small_sim: Simulator) -> None:
    """The affinity head's error shrinks from matching to ranking, as configured."""
    state = small_sim.start(1000, torch.arange(300))
    obs = small_sim.observe(state)
    w = small_sim.world
    true = torch.einsum("bd,bnd->bn", w.user_latent[obs.user], w.item_latent[obs.pool]).flatten()
    corr = []
    for pred, stage in zip(obs.predictions, small_cfg.cascade.stages):
        head = pred[..., stage.heads.index("affinity")].flatten()
        corr.append(float(torch.corrcoef(torch.stack([head, true]))[0, 1]))
    assert corr[0] < corr[1] < corr[2]


def test_replaying_observations_reproduces_every_candidate_set(
    small_cfg: Config, small_sim: Simulator
) -> None:
    steps: list[Step] = []
    rollout(small_sim, _policy(small_cfg), seed=1000, sessions=60, batch_size=60, on_step=steps.append)
    for step in steps:
        replayed = run_cascade(step.obs.predictions, small_sim.keep, replay_actions(step.cascade.actions))
        for logged, again in zip(step.cascade.candidates, replayed.candidates):
            assert torch.equal(logged, again)


def test_sessions_end_and_rewards_are_page_watch_time(small_cfg: Config, small_sim: Simulator) -> None:
    steps: list[Step] = []
    out = rollout(small_sim, _policy(small_cfg), seed=1000, sessions=60, batch_size=60, on_step=steps.append)
    assert (out.requests >= 1).all() and (out.requests <= small_cfg.session.max_requests).all()
    # finished sessions leave the batch as it goes: Observation.row says whose request each row is
    total = torch.zeros(60)
    done = torch.zeros(60, dtype=torch.long)
    for s in steps:
        total.index_add_(0, s.obs.row, torch.where(s.active, s.reward, 0.0))
        done.index_add_(0, s.obs.row, s.done.long())
    np.testing.assert_allclose(total.numpy(), out.watch_time, rtol=1e-5)
    assert len(steps[-1].active) < 60, "the batch dropped finished sessions"
    for s in steps:
        assert torch.equal(s.reward, s.response.watch_time.sum(1))
        # a user who leaves mid-page never comes back to it: viewed is a prefix of the page
        v = s.response.viewed.int()
        assert bool((v[:, 1:] <= v[:, :-1]).all())
    assert bool((done == 1).all()), "every session ends exactly once"


def test_two_to_five_stages(small_cfg: Config) -> None:
    """The number of stages is configuration: a 2-stage and a 5-stage cascade simulate and replay."""
    two = (
        "[{name: retrieve, keep: 12, heads: [affinity, popularity], noise: 0.8}, "
        "{name: rank, keep: 4, heads: [affinity, quality, novelty], noise: 0.2}]"
    )
    five = (
        "["
        + ", ".join(
            f"{{name: s{i}, keep: {k}, heads: [affinity, quality, novelty], noise: {n}}}"
            for i, (k, n) in enumerate([(80, 1.0), (40, 0.8), (20, 0.6), (10, 0.4), (4, 0.2)])
        )
        + "]"
    )
    for stages, n in ((two, 2), (five, 5)):
        cfg = load_config(
            None,
            ["world.n_users=200", "world.n_items=3000", "cascade.pool_size=150", f"cascade.stages={stages}"],
        )
        sim = Simulator(cfg)
        steps: list[Step] = []
        policy = WeightPolicy(torch.full((1, sum(cfg.cascade.action_dims)), 0.5), cfg.cascade)
        out = rollout(sim, policy, seed=1000, sessions=20, batch_size=20, on_step=steps.append)
        assert len(steps[0].cascade.candidates) == n
        assert steps[0].page_items.shape[1] == 4
        assert (out.watch_time > 0).all()
        replayed = run_cascade(steps[0].obs.predictions, sim.keep, replay_actions(steps[0].cascade.actions))
        assert torch.equal(replayed.page, steps[0].cascade.page)
