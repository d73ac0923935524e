"""User features on the model's path: one input function, the same row from the simulator, the training set and
the online store.

- the simulator's running user_behaviour (unexrl/sim/behaviour.py) equals `unexrl features build`'s on the same
  logs, joined point-in-time at every logged request;
- parity: the input built at serving time from the online store, materialised as of a logged request's
  timestamp, equals the input built at training time from the training set's row of that request, for users with
  history and cold users;
- serving's session totals (the store's row at a session's start, its answered pages added) give each later
  request of the session its training row's input;
- offline training reads the training set's rows, and refuses to train without one.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from tests.test_features import _repo_copy, _with_features
from unexrl.config import Config
from unexrl.data import LogWriter, read_logs
from unexrl.evaluate.rollout import rollout
from unexrl.features import schema as fs
from unexrl.features import store
from unexrl.features.build import build_features, compute_feature_tables, feedback_us
from unexrl.features.client import FeatureClient
from unexrl.policies.weights import RandomPolicy
from unexrl.rl.observation import state_dim
from unexrl.rl.replay import ReplayBuffer
from unexrl.serve.behaviour import SessionBehaviour
from unexrl.sim.behaviour import UserBehaviour
from unexrl.sim.env import Simulator, Step
from unexrl.user_features import COLUMNS, cold_inputs, served_inputs, user_inputs

Seen = dict[tuple[int, int], torch.Tensor]
"""(session, step) -> the user features the simulator gave that request"""
SESSIONS = 240
BATCH = 40
"""several rollout batches, so users return across batches (and a few within one)"""


@pytest.fixture(scope="module")
def cfg(small_cfg: Config) -> Config:
    logging = small_cfg.logging.model_copy(update={"sessions": SESSIONS, "batch_size": BATCH})
    return small_cfg.model_copy(update={"logging": logging})


@pytest.fixture(scope="module")
def logged(cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Seen]:
    """Logs of a random-weights rollout, and the user features the simulator gave each logged request."""
    sim = Simulator(cfg)
    out = tmp_path_factory.mktemp("user-features") / "logs"
    seen: Seen = {}
    with LogWriter(cfg, sim.world, out) as writer:

        def record(step: Step) -> None:
            writer.add(step)
            a = step.active
            for s, t, x in zip(step.obs.session[a], step.obs.step[a], step.obs.user_features[a]):
                seen[(int(s), int(t))] = x

        rollout(sim, RandomPolicy(cfg.cascade, seed=3), cfg.seeds.train[0], SESSIONS, BATCH, on_step=record)
        writer.close(behaviour={"kind": "random"}, seeds=[cfg.seeds.train[0]])
    return out, seen


def _as_of(behaviour: pa.Table, user: np.ndarray, at_us: np.ndarray) -> dict[str, pa.Array]:
    """The user_behaviour row of each (user, time) a point-in-time join keeps (newest stamped <= time), or nulls."""
    b_user = np.asarray(behaviour["user_id"])
    b_us = np.asarray(behaviour[fs.TIMESTAMP].cast(pa.int64()))
    index = np.full(len(user), -1)
    for i, (u, t) in enumerate(zip(user, at_us)):
        rows = np.flatnonzero((b_user == u) & (b_us <= t))
        if rows.size:
            index[i] = rows[np.argmax(b_us[rows])]
    take = pa.array(np.maximum(index, 0), mask=index < 0)
    return {
        f"{fs.USER_BEHAVIOUR.name}__{f.name}": behaviour[f.name].take(take)
        for f in fs.USER_BEHAVIOUR.features
    }


def _alone(t: pa.Table) -> np.ndarray:
    """Per logged request: its user has no two sessions in one lockstep batch, nor overlapping in log time (from
    the first request to the last page's feedback): the requests whose rows the documented exception spares."""
    user = np.asarray(t["user_id"])
    sessions = (
        pd.DataFrame(
            {
                "user": user,
                "session": np.asarray(t["session_id"]),
                "start": np.asarray(t[fs.TIMESTAMP].cast(pa.int64())),
                "end": feedback_us(np.asarray(t[fs.TIMESTAMP].cast(pa.int64())), np.asarray(t["reward"])),
            }
        )
        .groupby(["user", "session"], as_index=False)
        .agg(start=("start", "min"), end=("end", "max"))
    )
    sessions = sessions.sort_values(["user", "start"])
    earlier = sessions.groupby("user")
    overlap = sessions["start"] <= earlier["end"].transform(lambda end: end.cummax().shift())
    same_batch = sessions["session"] // BATCH == earlier["session"].shift() // BATCH
    return ~np.isin(user, sessions["user"][overlap | same_batch].unique())


def test_the_simulator_keeps_the_builds_user_behaviour(cfg: Config, logged: tuple[Path, Seen]) -> None:
    logs, seen = logged
    data = read_logs(logs)
    t = data.transitions
    behaviour = compute_feature_tables(data, cfg)[fs.USER_BEHAVIOUR.name]
    user = np.asarray(t["user_id"])
    session = np.asarray(t["session_id"])
    step = np.asarray(t["step"])
    built = user_inputs(_as_of(behaviour, user, np.asarray(t[fs.TIMESTAMP].cast(pa.int64()))), cfg)
    simulated = torch.stack([seen[(int(s), int(k))] for s, k in zip(session, step)])

    alone = _alone(t)  # the documented exception: the other requests
    returning = alone & (built[:, 0].numpy() > 0) & (step == 0)  # a first request that already has history
    assert returning.sum() > 20, "the log should have users returning across batches"
    assert alone.mean() > 0.8
    torch.testing.assert_close(simulated[alone], built[alone], rtol=1e-5, atol=1e-5)
    cold = built[:, 0] == 0
    assert cold.any() and torch.equal(built[cold], cold_inputs(int(cold.sum()), cfg))


def _features_seen(cfg: Config, within_session: bool) -> Seen:
    """The user features of every request of a random-weights rollout."""
    seen: Seen = {}

    def record(step: Step) -> None:
        a = step.active
        for s, t, x in zip(step.obs.session[a], step.obs.step[a], step.obs.user_features[a]):
            seen[(int(s), int(t))] = x

    sim = Simulator(cfg)
    behaviour = UserBehaviour(cfg, sim.world, within_session=within_session)
    policy = RandomPolicy(cfg.cascade, seed=3)
    rollout(sim, policy, cfg.seeds.train[0], SESSIONS, BATCH, record, behaviour=behaviour)
    return seen


def test_the_store_row_alone_leaves_the_sessions_own_pages_out(cfg: Config) -> None:
    """From the store's row alone (materialised before each batch), every request of a session sees what its first
    request saw, its user's earlier sessions; as trained, each later request also sees the session's earlier pages
    (the skew serving's session totals close, docs/features.md)."""
    served, trained = _features_seen(cfg, within_session=False), _features_seen(cfg, within_session=True)
    assert served.keys() == trained.keys()  # the policy does not read the features: the same sessions
    later = [(s, t) for s, t in served if t > 0]
    assert len(later) > 100
    assert all(torch.equal(served[(s, 0)], trained[(s, 0)]) for s, t in served if t == 0)
    cold = cold_inputs(1, cfg)[0]
    assert sum(not torch.equal(served[(s, 0)], cold) for s, t in served if t == 0) > 20  # users with history
    assert all(torch.equal(served[(s, t)], served[(s, 0)]) for s, t in later)
    assert not any(torch.equal(trained[(s, t)], trained[(s, 0)]) for s, t in later)


def test_a_served_session_reads_its_own_pages_as_training_does(
    cfg: Config, logged: tuple[Path, Seen]
) -> None:
    """Serving's session totals (unexrl/serve/behaviour.py): the store's row as of a session's first request with
    each answered page added give every later request of the session the input of its training-set row (the
    build's row as of the request), where the store's row as of the session's start does not; and after each
    page, the row serving pushes back is the build's row stamped at that page's feedback, every column."""
    logs, _ = logged
    data = read_logs(logs)
    t = data.transitions
    world = Simulator(cfg).world
    behaviour = compute_feature_tables(data, cfg)[fs.USER_BEHAVIOUR.name]
    rows = _as_of(behaviour, np.asarray(t["user_id"]), np.asarray(t[fs.TIMESTAMP].cast(pa.int64())))
    k = cfg.cascade.page_size
    shown, watch, viewed, click, like = (
        np.asarray(t[name].combine_chunks().flatten()).reshape(-1, k)
        for name in ("shown_item_ids", "watch_time_s", "viewed", "click", "like")
    )
    step, alone = np.asarray(t["step"]), _alone(t)
    at_feedback = _as_of(
        behaviour,
        np.asarray(t["user_id"]),
        feedback_us(np.asarray(t[fs.TIMESTAMP].cast(pa.int64())), np.asarray(t["reward"])),
    )
    pushed = 0

    def trained(r: int) -> torch.Tensor:
        return user_inputs({name: column.take([r]) for name, column in rows.items()}, cfg)

    served: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []
    as_of_start: list[torch.Tensor] = []
    session = SessionBehaviour.of_row({}, cfg)
    start = 0
    for r in np.lexsort((step, np.asarray(t["session_id"]))):  # each session's requests in order
        if step[r] == 0:
            session = SessionBehaviour.of_row({name: column[r].as_py() for name, column in rows.items()}, cfg)
            start = r
        elif alone[r]:
            served.append(session.inputs(cfg))
            expected.append(trained(r))
            as_of_start.append(trained(start))
        v = viewed[r]
        session = session.with_page(
            world,
            cfg,
            first=step[r] == 0,
            viewed=shown[r][v].tolist(),
            watch_time_s=watch[r][v].tolist(),
            click=click[r][v].tolist(),
            like=like[r][v].tolist(),
        )
        if alone[r]:
            _assert_same_row(session.row(world, cfg), {k: c[r].as_py() for k, c in at_feedback.items()})
            pushed += 1
    assert len(served) > 200 and pushed > 400
    torch.testing.assert_close(torch.cat(served), torch.cat(expected), rtol=1e-5, atol=1e-5)
    skewed = ~torch.isclose(torch.cat(as_of_start), torch.cat(expected), rtol=1e-5, atol=1e-5).all(1)
    assert skewed.float().mean() > 0.9


def _assert_same_row(pushed: dict[str, object], built: dict[str, object]) -> None:
    """A user_behaviour row serving pushes (short names) is the build's (full names): counts and item ids equal,
    reals to float32 rounding of sums recovered from float32 means."""
    assert pushed.keys() == {name.removeprefix(f"{fs.USER_BEHAVIOUR.name}__") for name in built}
    for f in fs.USER_BEHAVIOUR.features:
        ours, theirs = pushed[f.name], built[f"{fs.USER_BEHAVIOUR.name}__{f.name}"]
        if f.dtype.startswith("int64"):
            assert ours == theirs, f.name
        else:
            torch.testing.assert_close(
                torch.tensor(ours, dtype=torch.float64),
                torch.tensor(theirs, dtype=torch.float64),
                rtol=1e-5,
                atol=1e-5,
                msg=f.name,
            )


def test_online_store_and_training_set_give_the_same_input(
    cfg: Config, logged: tuple[Path, Seen], tmp_path: Path
) -> None:
    """Parity: for logged requests in time order, materialise the store up to each one's timestamp and build
    the input as serving does; it equals the input built from the training set's row of that request."""
    logs, _ = logged
    features = tmp_path / "features"
    build_features(logs, features, cfg)
    local = _with_features(cfg, repo=str(_repo_copy(tmp_path / "feature_repo")))
    feast = store.apply(local, features)
    _, training = store.training_set(local, logs, tmp_path / "training.parquet")
    order = np.argsort(np.asarray(training[fs.TIMESTAMP].cast(pa.int64())), kind="stable")
    history = np.asarray(training[f"{fs.USER_BEHAVIOUR.name}__requests"].is_valid())
    picks = [*order[~history[order]][1:4:2], *order[history[order]][::97][:6]]
    picks = sorted(picks, key=lambda r: training[fs.TIMESTAMP][r].as_py())
    client = FeatureClient(local, feast)
    start = min(pd.Timestamp(training[fs.TIMESTAMP][0].as_py()), pd.Timestamp("2000-01-01", tz="UTC"))
    cold = warm = 0
    for row in picks:
        at = training[fs.TIMESTAMP][row].as_py()
        feast.materialize(
            start_date=start, end_date=at + timedelta(microseconds=1), feature_views=[fs.USER_BEHAVIOUR.name]
        )
        served = served_inputs(client.fetch(int(training["user_id"][row].as_py()), []).user, cfg)
        trained = user_inputs({c: training[c].take([row]) for c in COLUMNS}, cfg)
        assert torch.equal(served, trained), f"request {training['request_id'][row]}"
        cold, warm = cold + int(not history[row]), warm + int(history[row])
    assert cold >= 1 and warm >= 5


def test_offline_training_reads_the_training_set(
    cfg: Config, logged: tuple[Path, Seen], tmp_path: Path
) -> None:
    logs, _ = logged
    data = read_logs(logs)
    buffer = ReplayBuffer(cfg, 100_000)
    with pytest.raises(ValueError, match="--training-set"):
        buffer.add_logs(data)
    build_features(logs, tmp_path / "features", cfg)
    local = _with_features(cfg, repo=str(_repo_copy(tmp_path / "feature_repo")))
    store.apply(local, tmp_path / "features")
    _, training = store.training_set(local, logs, tmp_path / "training.parquet")
    n = buffer.add_logs(data, training)
    assert buffer.state.shape[1] == state_dim(cfg)
    by_request = {r: i for i, r in enumerate(training["request_id"].to_pylist())}
    rows = [by_request[r] for r in data.transitions["request_id"].to_pylist()]
    expected = user_inputs({c: training[c].take(rows) for c in COLUMNS}, cfg)
    assert torch.equal(buffer.state[:n, -expected.shape[1] :], expected)
    without = cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"user_features": False})})
    plain = ReplayBuffer(without, 100_000)
    plain.add_logs(data)
    assert plain.state.shape[1] == state_dim(cfg) - expected.shape[1]
    assert torch.equal(plain.state[:n], buffer.state[:n, : plain.state.shape[1]])


def test_the_input_reads_the_contracts_view() -> None:
    from unexrl.user_features import VIEW

    assert VIEW == fs.USER_BEHAVIOUR.name
    assert set(COLUMNS) <= {f"{VIEW}__{f.name}" for f in fs.USER_BEHAVIOUR.features}


def test_bad_feature_rows_are_named(cfg: Config) -> None:
    with pytest.raises(ValueError, match="category_watch_share"):
        user_inputs({COLUMNS[-1]: [[0.5, 0.5]]}, cfg)
    with pytest.raises(ValueError, match="differ in length"):
        user_inputs({COLUMNS[0]: [1, 2], COLUMNS[1]: [1]}, cfg)
