"""The logged-data contract: write -> read -> validate -> replay, and rejection of defective logs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from unexrl.cascade import replay_actions, run_cascade
from unexrl.config import Config, load_config
from unexrl.data import LogValidationError, LogWriter, cascade_inputs, read_logs, transitions_schema
from unexrl.data.schema import ITEMS_FILE, MANIFEST_FILE, TABLE_FILES, TRANSITIONS_FILE, USERS_FILE
from unexrl.evaluate.rollout import rollout
from unexrl.io import sha256_file
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.sim.env import Simulator, Step

TINY = [
    "world.n_users=200",
    "world.n_items=2000",
    "world.n_categories=10",
    "cascade.pool_size=60",
    "cascade.stages.0.keep=20",
    "cascade.stages.1.keep=8",
    "cascade.stages.2.keep=4",
    "session.max_requests=6",
]
SEED = 1000
SESSIONS = 400


@dataclass(frozen=True)
class Logged:
    cfg: Config
    sim: Simulator
    policy: GaussianExploration
    path: Path
    steps: list[Step]


def _policy(cfg: Config) -> GaussianExploration:
    """Random per-activity-group weights plus exploration noise, so logged actions vary row by row."""
    low, high = cfg.cascade.action_low, cfg.cascade.action_high
    g = torch.Generator().manual_seed(7)
    n_groups, dims = len(cfg.world.user_types), sum(cfg.cascade.action_dims)
    weights = low + (high - low) * torch.rand(n_groups, dims, generator=g)
    return GaussianExploration(
        WeightPolicy(weights, cfg.cascade, group_by="activity_group"), std=0.3, seed=SEED
    )


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    cfg = load_config(None, TINY)
    sim = Simulator(cfg)
    policy = _policy(cfg)
    path = tmp_path_factory.mktemp("logs") / "run"
    steps: list[Step] = []
    with LogWriter(cfg, sim.world, path, row_group_rows=128) as writer:

        def on_step(step: Step) -> None:
            steps.append(step)
            writer.add(step)

        rollout(sim, policy, SEED, SESSIONS, batch_size=64, on_step=on_step)
        writer.close({"kind": "random+gaussian", "std": 0.3}, [SEED])
    return Logged(cfg, sim, policy, path, steps)


def test_roundtrip_validates_and_counts(logged: Logged) -> None:
    data = read_logs(logged.path)
    active = sum(int(s.active.sum()) for s in logged.steps)
    t = data.transitions
    assert t.num_rows == active > SESSIONS
    assert t.column_names == transitions_schema(logged.cfg).names
    assert data.users.column_names == ["user_id", "activity_group"]
    assert data.users.num_rows == logged.cfg.world.n_users and data.items.num_rows == logged.cfg.world.n_items
    assert pq.ParquetFile(logged.path / TRANSITIONS_FILE).num_row_groups > 1
    m = data.manifest
    assert m.seeds == [SEED] and m.behaviour["kind"] == "random+gaussian"
    assert m.config == logged.cfg.to_dict() and data.config == logged.cfg
    for name in TABLE_FILES:
        assert m.files[name].sha256 == sha256_file(logged.path / name)
    assert m.files[TRANSITIONS_FILE].rows == active
    assert data.manifest_sha256 == sha256_file(logged.path / MANIFEST_FILE)
    assert not list(logged.path.parent.glob(".*")), "temporary directories left behind"

    reward = torch.cat([s.reward[s.active] for s in logged.steps]).numpy()
    np.testing.assert_array_equal(t["reward"].to_numpy(), reward)
    assert t["session_id"].to_numpy().max() == SESSIONS - 1
    history = pc.list_flatten(t["history_item_ids"]).to_numpy()
    assert history.size and (history >= 0).all()
    done = t["done"].to_numpy()
    assert done.sum() == SESSIONS
    np.testing.assert_array_equal(
        t["next_request_id"].to_numpy(zero_copy_only=False)[~done], t["request_id"].to_numpy()[~done] + 1
    )

    start = datetime.fromisoformat(logged.cfg.logging.start_time)
    row = t.slice(int(np.flatnonzero(t["step"].to_numpy() > 0)[0]), 1).to_pylist()[0]
    expected = start + timedelta(
        seconds=row["session_id"] * 30
        + row["step"] * logged.cfg.session.seconds_between_requests
        + float(row["session_watch_time_s"])
    )
    assert abs(row["event_timestamp"] - expected) <= timedelta(microseconds=1)


def test_predictions_are_float16_exact(logged: Logged) -> None:
    """The simulator's predictions survive the float16 column bit for bit, in row order."""
    data = read_logs(logged.path)
    preds, actions, _ = cascade_inputs(data.transitions, logged.cfg)
    for i in range(len(logged.cfg.cascade.stages)):
        sim_pred = torch.cat([s.obs.predictions[i][s.active] for s in logged.steps])
        assert torch.equal(sim_pred.half().float(), sim_pred)
        assert torch.equal(preds[i], sim_pred)
        assert torch.equal(actions[i], torch.cat([s.cascade.actions[i][s.active] for s in logged.steps]))


def _assert_replays(transitions: pa.Table, cfg: Config, chunk: int) -> None:
    keep = [s.keep for s in cfg.cascade.stages]
    last = len(keep) - 1
    for start in range(0, transitions.num_rows, chunk):
        preds, actions, logged = cascade_inputs(transitions.slice(start, chunk), cfg)
        replayed = run_cascade(preds, keep, replay_actions(actions)).candidates
        for i, (got, want) in enumerate(zip(replayed, logged, strict=True)):
            if i == last:
                assert torch.equal(got, want), f"page order differs in rows {start}..{start + chunk}"
            else:
                assert torch.equal(got.sort(1).values, want.sort(1).values), (
                    f"stage {i} set differs at {start}"
                )


@pytest.mark.parametrize("chunk", [1_000_000, 7], ids=["one-batch", "chunks-of-7"])
def test_replay_reproduces_logged_candidates(logged: Logged, chunk: int) -> None:
    data = read_logs(logged.path)
    _assert_replays(data.transitions, logged.cfg, chunk)


def _rewrite(log: Path, name: str, table: pa.Table, update_manifest: bool = True) -> None:
    """Write a table over ``name``; ``update_manifest`` mimics a producer that keeps its manifest consistent."""
    pq.write_table(table, log / name)
    if update_manifest:
        manifest = json.loads((log / MANIFEST_FILE).read_text())
        manifest["files"][name] = {"rows": table.num_rows, "sha256": sha256_file(log / name)}
        (log / MANIFEST_FILE).write_text(json.dumps(manifest))


def _with(table: pa.Table, column: str, new: pa.Array | pa.ChunkedArray) -> pa.Table:
    i = table.schema.get_field_index(column)
    return table.set_column(i, pa.field(column, new.type), new)


def _set(table: pa.Table, column: str, row: int, value: object, pos: int = 0) -> pa.Table:
    """Set one scalar (or element ``pos`` of a fixed-size list row), keeping the column's type."""
    col = table[column].combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False).copy()
        flat[row * col.type.list_size + pos] = value
        new = pa.FixedSizeListArray.from_arrays(pa.array(flat, col.type.value_type), type=col.type)
    else:
        values = col.to_numpy(zero_copy_only=False).copy()
        values[row] = value
        new = pa.array(values, col.type)
    return _with(table, column, new)


def _set_list(table: pa.Table, column: str, row: int, values: list[int]) -> pa.Table:
    cells = table[column].to_pylist()
    cells[row] = values
    return _with(table, column, pa.array(cells, table[column].type))


def _ragged_pool(t: pa.Table) -> pa.Table:
    pools = t["pool_item_ids"].to_pylist()
    pools[2] = pools[2][:-1]
    return _with(t, "pool_item_ids", pa.array(pools, pa.list_(pa.int64())))


Defect = Callable[[pa.Table], pa.Table]
N_USERS, N_ITEMS, POOL = 200, 2000, 60
DEFECTS: list[tuple[str, str, str | None, int | None, str, Defect]] = [
    (
        "missing-column",
        TRANSITIONS_FILE,
        "reward",
        None,
        "missing column",
        lambda t: t.drop_columns(["reward"]),
    ),
    (
        "reward-as-string",
        TRANSITIONS_FILE,
        "reward",
        None,
        "wrong dtype",
        lambda t: _with(t, "reward", t["reward"].cast(pa.string())),
    ),
    (
        "reward-as-int",
        TRANSITIONS_FILE,
        "reward",
        None,
        "wrong dtype",
        lambda t: _with(t, "reward", t["reward"].cast(pa.int64(), safe=False)),
    ),
    ("nan-reward", TRANSITIONS_FILE, "reward", 3, "NaN", lambda t: _set(t, "reward", 3, np.nan)),
    (
        "inf-watch-time",
        TRANSITIONS_FILE,
        "watch_time_s",
        4,
        "NaN or infinite",
        lambda t: _set(t, "watch_time_s", 4, np.inf, pos=1),
    ),
    (
        "user-out-of-range",
        TRANSITIONS_FILE,
        "user_id",
        5,
        "not in the users table",
        lambda t: _set(t, "user_id", 5, N_USERS + 7),
    ),
    (
        "pool-item-out-of-range",
        TRANSITIONS_FILE,
        "pool_item_ids",
        4,
        "not in the items table",
        lambda t: _set(t, "pool_item_ids", 4, N_ITEMS, pos=3),
    ),
    (
        "candidate-out-of-range",
        TRANSITIONS_FILE,
        "candidates_prerank",
        2,
        "outside [0, 60)",
        lambda t: _set(t, "candidates_prerank", 2, POOL),
    ),
    ("ragged-pool", TRANSITIONS_FILE, "pool_item_ids", 2, "ragged", _ragged_pool),
    (
        "duplicate-request-id",
        TRANSITIONS_FILE,
        "request_id",
        6,
        "duplicate",
        lambda t: _set(t, "request_id", 6, t["request_id"][5].as_py()),
    ),
    (
        "user-ids-not-row-positions",
        USERS_FILE,
        "user_id",
        3,
        "row positions",
        lambda t: _set(t, "user_id", 3, N_USERS + 5),
    ),
    (
        "users-group-of-another-world",
        USERS_FILE,
        "activity_group",
        4,
        "of the config's world",
        lambda t: _set(t, "activity_group", 4, (t["activity_group"][4].as_py() + 1) % 3),
    ),
    (
        "item-duration-of-another-world",
        ITEMS_FILE,
        "duration_s",
        7,
        "of the config's world",
        lambda t: _set(t, "duration_s", 7, t["duration_s"][7].as_py() + 1.0),
    ),
    (
        "history-longer-than-the-window",
        TRANSITIONS_FILE,
        "history_item_ids",
        2,
        "longer than session.history_window",
        lambda t: _with(
            t,
            "history_item_ids",
            pa.array(
                [h if i != 2 else list(range(50)) for i, h in enumerate(t["history_item_ids"].to_pylist())],
                t["history_item_ids"].type,
            ),
        ),
    ),
    (
        "negative-watch-time",
        TRANSITIONS_FILE,
        "watch_time_s",
        3,
        "outside [0, the item's duration]",
        lambda t: _set(t, "watch_time_s", 3, -1.0, pos=0),
    ),
    (
        "watch-time-beyond-the-duration",
        TRANSITIONS_FILE,
        "watch_time_s",
        5,
        "outside [0, the item's duration]",
        lambda t: _set(t, "watch_time_s", 5, 86400.0, pos=0),
    ),
    (
        "reward-not-the-page-watch-time",
        TRANSITIONS_FILE,
        "reward",
        3,
        "not the page's watch time",
        lambda t: _set(t, "reward", 3, t["reward"][3].as_py() + 1.0),
    ),
    (
        "users-group-as-int64",
        USERS_FILE,
        "activity_group",
        None,
        "expected int32, found int64",
        lambda t: _with(t, "activity_group", t["activity_group"].cast(pa.int64())),
    ),
]


@pytest.mark.parametrize(
    ("file", "column", "row", "problem", "defect"), [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS]
)
def test_rejects_defective_logs(
    logged: Logged,
    tmp_path: Path,
    file: str,
    column: str | None,
    row: int | None,
    problem: str,
    defect: Defect,
) -> None:
    bad = shutil.copytree(logged.path, tmp_path / "bad")
    _rewrite(bad, file, defect(pq.read_table(bad / file)))
    with pytest.raises(LogValidationError) as err:
        read_logs(bad)
    message = str(err.value)
    assert file in message and f"'{column}'" in message and problem in message, message
    if row is not None:
        assert f"rows [{row}]" in message, message
        assert err.value.rows == [row]


def _last_request(t: pa.Table) -> int:
    """The first row that ends a session of more than one request: breaking it breaks no other row's rule."""
    return int(np.flatnonzero(t["done"].to_numpy() & (t["step"].to_numpy() > 0))[0])


def _previous(t: pa.Table, row: int) -> int:
    """The row of the same session's previous request."""
    return int(np.flatnonzero(t["request_id"].to_numpy() == t["request_id"][row].as_py() - 1)[0])


def _previous_ends_the_session(t: pa.Table, row: int) -> pa.Table:
    before = _previous(t, row)
    t = _set(t, "done", before, True)
    nxt = t["next_request_id"].to_pylist()
    nxt[before] = None
    return _with(t, "next_request_id", pa.array(nxt, pa.int64()))


SESSION_DEFECTS: list[tuple[str, str, str, Callable[[pa.Table, int], pa.Table]]] = [
    (
        "user-changes-within-a-session",
        "user_id",
        "not the user of the session's previous request",
        lambda t, r: _set(t, "user_id", r, (t["user_id"][r].as_py() + 1) % N_USERS),
    ),
    (
        "request-not-after-the-previous",
        "event_timestamp",
        "not after the session's previous request",
        lambda t, r: _set(t, "event_timestamp", r, t["event_timestamp"].to_numpy()[_previous(t, r)]),
    ),
    (
        "items-watched-not-carried",
        "session_items_watched",
        "plus the items its page had viewed",
        lambda t, r: _set(t, "session_items_watched", r, t["session_items_watched"][r].as_py() + 1),
    ),
    (
        "watch-time-not-carried",
        "session_watch_time_s",
        "plus its page's reward",
        lambda t, r: _set(t, "session_watch_time_s", r, t["session_watch_time_s"][r].as_py() + 5.0),
    ),
    (
        "last-watch-fraction-not-carried",
        "last_watch_fraction",
        "not the mean watch fraction of the previous request's viewed items",
        lambda t, r: _set(t, "last_watch_fraction", r, t["last_watch_fraction"][r].as_py() / 2),
    ),
    (
        "history-not-carried",
        "history_item_ids",
        "not the previous request's history plus its page's viewed items",
        lambda t, r: _set_list(
            t, "history_item_ids", r, [(i + 1) % N_ITEMS for i in t["history_item_ids"][r].as_py()]
        ),
    ),
    (
        "request-after-the-session-ended",
        "step",
        "or after its done request",
        _previous_ends_the_session,
    ),
]


@pytest.mark.parametrize(
    ("column", "problem", "defect"), [d[1:] for d in SESSION_DEFECTS], ids=[d[0] for d in SESSION_DEFECTS]
)
def test_rejects_broken_sessions(
    logged: Logged, tmp_path: Path, column: str, problem: str, defect: Callable[[pa.Table, int], pa.Table]
) -> None:
    """A session is one user's requests from step 0 to done, in time, each logging the state its pages left."""
    bad = shutil.copytree(logged.path, tmp_path / "bad")
    table = pq.read_table(bad / TRANSITIONS_FILE)
    row = _last_request(table)
    _rewrite(bad, TRANSITIONS_FILE, defect(table, row))
    with pytest.raises(LogValidationError) as err:
        read_logs(bad)
    assert f"'{column}'" in str(err.value) and problem in str(err.value), err.value
    assert err.value.rows == [row]


def test_rejects_a_session_without_its_first_request(logged: Logged, tmp_path: Path) -> None:
    bad = shutil.copytree(logged.path, tmp_path / "bad")
    table = pq.read_table(bad / TRANSITIONS_FILE)
    second = int(np.flatnonzero(table["step"].to_numpy() == 1)[0])
    first = _previous(table, second)
    _rewrite(bad, TRANSITIONS_FILE, pa.concat_tables([table.slice(0, first), table.slice(first + 1)]))
    with pytest.raises(LogValidationError, match=r"'step': a request after step 0 without") as err:
        read_logs(bad)
    assert err.value.rows == [second - 1]  # the second request's row once the first one's is gone


@pytest.mark.parametrize(
    ("column", "problem", "value"),
    [
        ("session_items_watched", "not 0", 3),
        ("session_watch_time_s", "not 0", 10.0),
        ("last_watch_fraction", "not 0.5", 0.9),
        ("history_item_ids", "not empty", [7]),
    ],
)
def test_rejects_session_state_at_its_first_request(
    logged: Logged, tmp_path: Path, column: str, problem: str, value: object
) -> None:
    bad = shutil.copytree(logged.path, tmp_path / "bad")
    table = pq.read_table(bad / TRANSITIONS_FILE)
    row = int(np.flatnonzero(table["step"].to_numpy() == 0)[2])
    broken = (
        _set_list(table, column, row, value) if isinstance(value, list) else _set(table, column, row, value)
    )
    _rewrite(bad, TRANSITIONS_FILE, broken)
    with pytest.raises(
        LogValidationError, match=rf"'{column}': {problem} at a session's first request"
    ) as err:
        read_logs(bad)
    assert err.value.rows == [row]


def test_rejects_file_changed_after_manifest(logged: Logged, tmp_path: Path) -> None:
    bad = shutil.copytree(logged.path, tmp_path / "bad")
    table = pq.read_table(bad / TRANSITIONS_FILE)
    _rewrite(
        bad,
        TRANSITIONS_FILE,
        _set(table, "like", 3, not table["like"][3][0].as_py(), pos=0),  # a field no content rule covers
        update_manifest=False,
    )
    with pytest.raises(
        LogValidationError, match=rf"^{TRANSITIONS_FILE}: sha256 .* does not match the manifest"
    ):
        read_logs(bad)


def test_accepts_variable_length_lists(logged: Logged, tmp_path: Path) -> None:
    """Files from other writers may use list<> instead of fixed_size_list<>: same checks, same replay."""
    log = shutil.copytree(logged.path, tmp_path / "lists")
    t = pq.read_table(log / TRANSITIONS_FILE)
    for name in t.column_names:
        if pa.types.is_fixed_size_list(t[name].type):
            t = _with(t, name, t[name].cast(pa.list_(t[name].type.value_type)))
    _rewrite(log, TRANSITIONS_FILE, t)
    data = read_logs(log)
    assert pa.types.is_list(data.transitions["pool_item_ids"].type)
    _assert_replays(data.transitions, logged.cfg, 1_000_000)


def _small_rollout(logged: Logged, on_step: Callable[[Step], None], sessions: int = 20) -> None:
    rollout(logged.sim, logged.policy, SEED, sessions, batch_size=8, on_step=on_step)


def test_refuses_non_empty_out_dir(logged: Logged, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's file")
    with pytest.raises(FileExistsError, match="not empty"):
        LogWriter(logged.cfg, logged.sim.world, out)
    assert (out / "keep.txt").exists()

    with LogWriter(logged.cfg, logged.sim.world, out, overwrite=True) as writer:
        _small_rollout(logged, writer.add)
        writer.close({"kind": "test"}, [SEED])
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_FILE, *TABLE_FILES])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    read_logs(out)


def test_crash_while_writing_leaves_nothing(logged: Logged, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with (
        pytest.raises(RuntimeError, match="simulated crash"),
        LogWriter(logged.cfg, logged.sim.world, out) as writer,
    ):
        calls = 0

        def crash(step: Step) -> None:
            nonlocal calls
            writer.add(step)
            calls += 1
            if calls == 3:
                raise RuntimeError("simulated crash")

        _small_rollout(logged, crash)
    assert list(tmp_path.iterdir()) == []


def test_failed_close_leaves_nothing(logged: Logged, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with (
        pytest.raises(ValueError, match="Unable to serialize"),
        LogWriter(logged.cfg, logged.sim.world, out) as writer,
    ):
        _small_rollout(logged, writer.add)
        writer.close({"not json": object()}, [SEED])
    assert list(tmp_path.iterdir()) == []


def test_refuses_reused_session_ids(logged: Logged, tmp_path: Path) -> None:
    """Two rollouts over the same session ids would give colliding request ids: refused, nothing published."""
    with (
        pytest.raises(ValueError, match="duplicate request_ids"),
        LogWriter(logged.cfg, logged.sim.world, tmp_path / "run") as writer,
    ):
        _small_rollout(logged, writer.add, sessions=4)
        _small_rollout(logged, writer.add, sessions=4)
        writer.close({"kind": "test"}, [SEED])
    assert list(tmp_path.iterdir()) == []
