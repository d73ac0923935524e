"""The `actors` artifact: complete and verified on load, refused when tampered with or built for another cascade,
and served by `unexrl evaluate` like any policy artifact."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST_TRAIN, training_set_args
from unexrl.artifacts import load_any_policy
from unexrl.cli import main
from unexrl.config import Config, load_config
from unexrl.contracts.actors import ActorsManifest
from unexrl.contracts.artifact import ArtifactError, read_artifact
from unexrl.data import read_logs
from unexrl.features import schema as fs
from unexrl.features.store import TRAINING_SET_FILE
from unexrl.io import sha256_file
from unexrl.rl.actors import ACTORS_FILE, load_actor_policy
from unexrl.rl.observation import SPARSE_FEATURES, STATE_FEATURES
from unexrl.rl.policy import ActorPolicy
from unexrl.sim.env import Simulator
from unexrl.train.export import probe_actions
from unexrl.train.loop import train
from unexrl.user_features import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config", str(ROOT / "configs" / "small.yaml")]


@pytest.fixture(scope="module")
def export(
    tmp_path_factory: pytest.TempPathFactory,
    cem_artifact: Path,
    train_logs: Path,
    train_small: Callable[..., Path],
) -> Path:
    return train_small(tmp_path_factory.mktemp("export") / "run", "unexrl-ctde", cem_artifact, train_logs)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(ROOT / "configs" / "small.yaml")


def test_manifest_describes_what_serving_needs(export: Path, train_logs: Path, cem_artifact: Path) -> None:
    manifest = read_artifact(export, ActorsManifest)
    assert manifest.kind == "actors" and manifest.schema_version == 2
    assert set(manifest.files) == {ACTORS_FILE}
    assert [s.name for s in manifest.stages] == ["matching", "prerank", "ranking"]
    features = manifest.features
    assert features.sparse == list(SPARSE_FEATURES) and features.state == list(STATE_FEATURES)
    trained = manifest.trained_config()
    assert features.history_window == trained.session.history_window
    assert features.user_features is not None and features.user_features.columns == list(COLUMNS)
    assert features.user_features.recent_items == trained.features.recent_items
    assert features.id_space.model_dump() == {"world_seed": 0, "users": 600, "items": 6000, "categories": 12}
    assert features.tables == {
        "actors_users": (600, 16),
        "actors_items": (6000, 16),
        "actors_categories": (12, 16),
    }
    logs = json.loads((train_logs / "manifest.json").read_text())
    assert manifest.training_data.model_dump() == {
        "regime": "offline",
        "logs": str(train_logs),
        "seeds": logs["seeds"],
        "sha256": {k: v["sha256"] for k, v in logs["files"].items()},
        "training_set": {
            "file": str(train_logs / TRAINING_SET_FILE),
            "sha256": sha256_file(train_logs / TRAINING_SET_FILE),
            "rows": read_logs(train_logs).transitions.num_rows,
            "feature_service": fs.TRAINING_SERVICE,
        },
    }
    # what it saw: the config's training and validation seeds and the logs' (never to be evaluated on)
    seeds = manifest.trained_config().seeds
    assert set(manifest.seen_seeds) == {*seeds.train, *seeds.validation, *logs["seeds"]}
    assert manifest.fixed_stages.sha256 == read_artifact(cem_artifact).files
    evaluation = manifest.evaluation
    assert evaluation.curve[-1].updates == 6
    assert evaluation.final_validation_watch_time == evaluation.curve[-1].validation_watch_time > 0
    # unsharded: every table whole, nothing but tensors
    state = load_file(export / ACTORS_FILE)
    assert state["encoder.ebc.embedding_bags.actors_users.weight"].shape == (
        600,
        16,
    )  # one encoder for every stage


def test_offline_training_reads_each_input_once(
    train_logs: Path, small_sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is validated and hashed is what trains: the logs' tables and the training set are each read once, so
    a file replaced after its check cannot be the one the replay buffer gets."""
    cfg = load_config(ROOT / "configs" / "small.yaml", [*FAST_TRAIN, "train.regime=offline"])
    reads: dict[str, int] = {}
    read_bytes = Path.read_bytes

    def counted(path: Path) -> bytes:
        reads[path.name] = reads.get(path.name, 0) + 1
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", counted)
    training_set = train_logs / TRAINING_SET_FILE

    def by_path(read: Callable[..., Any]) -> Callable[..., Any]:
        def refuse(source: Any, *args: Any, **kwargs: Any) -> Any:
            assert Path(str(source)) != training_set, "the training set was read again, by its path"
            return read(source, *args, **kwargs)

        return refuse

    for name in ("read_table", "ParquetFile"):  # pyarrow opens files itself, unseen by read_bytes
        monkeypatch.setattr(pq, name, by_path(getattr(pq, name)))
    weights = torch.full((1, sum(cfg.cascade.action_dims)), 0.5)
    result = train(cfg, weights, small_sim, train_logs, progress=False, training_set=training_set)
    assert {name: reads.get(name) for name in ("transitions.parquet", TRAINING_SET_FILE)} == {
        "transitions.parquet": 1,
        TRAINING_SET_FILE: 1,
    }
    assert result.offline is not None and result.offline.training_set is not None
    assert result.offline.training_set.sha256 == sha256_file(training_set)
    assert result.offline.manifest.model_dump() == read_logs(train_logs).manifest.model_dump()


def test_loaded_actors_act_like_the_trained_ones(export: Path, cfg: Config, small_sim: Simulator) -> None:
    policy = load_any_policy(export, cfg, small_sim.world)
    assert isinstance(policy, ActorPolicy)
    run = export.parent
    sharded = load_file(run / "probe_actions.safetensors")
    for i, action in enumerate(probe_actions(policy, small_sim)):
        torch.testing.assert_close(action, sharded[f"stage{i}"], rtol=0, atol=1e-6)


def test_evaluate_serves_actor_artifacts(export: Path, cem_artifact: Path, tmp_path: Path) -> None:
    fast = [
        "--set",
        "evaluation.sessions_per_seed=20",
        "--set",
        "evaluation.bootstrap=20",
        "--set",
        "seeds.evaluation=[3000]",
    ]
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "evaluate",
                *SMALL,
                *fast,
                "--no-references",
                "--policy",
                f"cem={cem_artifact}",
                "--policy",
                f"ctde={export}",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result["policies"]) == {"cem", "ctde"}


def _copy(export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "copy"))


def test_tampered_weights_are_refused(
    export: Path, cfg: Config, small_sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy(export, tmp_path)
    weights = bytearray((copy / ACTORS_FILE).read_bytes())
    weights[-1] ^= 0x01  # one bit of one weight
    (copy / ACTORS_FILE).write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match="tampered"):
        load_actor_policy(copy, cfg, small_sim.world)
    assert main(["evaluate", *SMALL, "--no-references", "--policy", f"rl={copy}"]) == 2
    assert "tampered" in capsys.readouterr().err


def test_weights_that_do_not_fit_the_recorded_config_are_refused(
    export: Path, cfg: Config, small_sim: Simulator, tmp_path: Path
) -> None:
    copy = _copy(export, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["algo"]["hidden"] = 64  # the hashes still hold; the weights no longer fit the networks
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_actor_policy(copy, cfg, small_sim.world)


def _as_version_1(manifest: dict) -> dict:
    """An actors manifest as early version-1 exports wrote it: no history window, the user feature columns alone,
    a tuned run's seeds under ``seeds``, a CEM artifact's seen seeds not recorded."""
    features = {k: v for k, v in manifest["features"].items() if k != "history_window"}
    features["user_features"] = (manifest["features"]["user_features"] or {}).get("columns", [])
    fixed = dict(manifest["fixed_stages"])
    seen = fixed.pop("seen_seeds")
    if fixed["source"] == "tuned":
        fixed["seeds"] = seen
    return manifest | {"schema_version": 1, "features": features, "fixed_stages": fixed}


def test_a_version_1_actors_artifact_is_read_from_its_config(
    export: Path, cfg: Config, small_sim: Simulator, tmp_path: Path
) -> None:
    """An incumbent exported before version 2 still loads (what version 1 did not record is in its config), and is
    still refused where serving's inputs differ from its training config's; another version is refused by name."""
    copy = _copy(export, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(_as_version_1(manifest)))
    upgraded = read_artifact(copy, ActorsManifest)
    assert upgraded.schema_version == 2
    assert upgraded.sha256 == sha256_file(copy / "manifest.json")  # the identity of the document as written
    assert upgraded.features == read_artifact(export, ActorsManifest).features
    assert upgraded.fixed_stages.source == "artifact" and upgraded.fixed_stages.seen_seeds is None
    load_actor_policy(copy, cfg, small_sim.world)
    other = load_config(ROOT / "configs" / "small.yaml", ["session.history_window=5"])
    with pytest.raises(ArtifactError, match="feature schema"):
        load_actor_policy(copy, other, small_sim.world)
    # a run that tuned its own CEM weights called their seeds "seeds"
    tuned = manifest | {"fixed_stages": {"source": "tuned", "seen_seeds": [1000, 1001]}}
    (copy / "manifest.json").write_text(json.dumps(_as_version_1(tuned)))
    assert read_artifact(copy, ActorsManifest).fixed_stages.seen_seeds == [1000, 1001]
    # a version-1 document that cannot be upgraded says why, not which version this code reads
    broken = _as_version_1(manifest) | {"config": {"world": "not a config"}}
    (copy / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="version-1 actors manifest that cannot be read as version 2"):
        load_actor_policy(copy, cfg, small_sim.world)
    (copy / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 3}))
    with pytest.raises(ArtifactError, match="schema_version 3: this code reads version 2 of ActorsManifest"):
        load_actor_policy(copy, cfg, small_sim.world)


@pytest.mark.parametrize(
    "override, message",
    [
        ("cascade.stages.2.keep=3", "stages"),
        ("cascade.stages.1.heads=[affinity,expected_watch,quality,popularity]", "stages"),
        ("world.n_items=5000", "feature schema"),
        ("seeds.world=7", "feature schema"),
        ("session.max_requests=20", "feature schema"),
        ("session.history_window=5", "feature schema"),
        ("features.recent_items=5", "feature schema"),
        ("world.duration_median_s=30", "feature schema"),
        ("algo.user_features=false", "feature schema"),
    ],
)
def test_mismatched_configs_are_refused(
    export: Path, small_sim: Simulator, override: str, message: str
) -> None:
    other = load_config(ROOT / "configs" / "small.yaml", [override])
    with pytest.raises(ArtifactError, match=message):
        load_actor_policy(export, other, small_sim.world)  # refused before the world is used


def test_a_weights_artifact_is_not_an_actors_artifact(
    cem_artifact: Path, cfg: Config, small_sim: Simulator
) -> None:
    with pytest.raises(ArtifactError, match="artifact kind 'weights', not actors"):
        load_actor_policy(cem_artifact, cfg, small_sim.world)


def test_inputs_from_held_out_seeds_are_refused(
    tmp_path: Path,
    cem_artifact: Path,
    train_logs: Path,
    single_thread: Callable[[], AbstractContextManager[None]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Logs from a seed the config validates on, or a CEM artifact that saw a seed it evaluates on, would let model
    selection or the reported results read sessions the policy was built from: training refuses both up front."""
    logged = read_logs(train_logs).manifest.seeds
    seen = read_artifact(cem_artifact).seen_seeds
    tuned = read_artifact(cem_artifact).trained_config().seeds.train
    fast = [x for o in FAST_TRAIN for x in ("--set", o)]
    train = ["train", *SMALL, *fast, "--algo", "unexrl-ctde", "--cem", str(cem_artifact)]
    cases = {
        # the logs' own seed becomes the validation seed
        f"the logs {train_logs} came from seeds {logged}, which are this config's seeds.validation": [
            "--logs",
            str(train_logs),
            *training_set_args(train_logs),
            "--set",
            f"seeds.train=[{max(logged) + 7}]",
            "--set",
            f"seeds.validation=[{logged[0]}]",
        ],
        # a seed the CEM artifact was tuned on becomes the validation seed
        f"the CEM artifact {cem_artifact} came from seeds [{tuned[0]}], which are this config's seeds.validation": [
            "--set",
            f"seeds.train=[{max(seen) + 7}]",
            "--set",
            f"seeds.validation=[{tuned[0]}]",
        ],
        # a seed the CEM artifact saw becomes an evaluation seed
        f"the CEM artifact {cem_artifact} came from seeds [{seen[0]}], which are this config's seeds.evaluation": [
            "--set",
            f"seeds.train=[{max(seen) + 7}]",
            "--set",
            f"seeds.evaluation=[{seen[0]}]",
        ],
    }
    for message, args in cases.items():
        with single_thread():
            assert main([*train, *args, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run" / "export").exists()


def test_the_export_has_seen_what_its_cem_artifact_saw(
    tmp_path: Path, cem_artifact: Path, single_thread: Callable[[], AbstractContextManager[None]]
) -> None:
    """The CEM weights are the fixed stages and the actors' starting point, so the seeds they were tuned on are
    among the export's seen_seeds (which the release evaluation refuses to evaluate on), whatever this config's
    training seeds are."""
    seen = set(read_artifact(cem_artifact).seen_seeds)
    fast = [x for o in FAST_TRAIN for x in ("--set", o)]
    args = ["train", *SMALL, *fast, "--algo", "unexrl-ctde", "--set", "seeds.train=[1500]"]
    with single_thread():
        assert main([*args, "--cem", str(cem_artifact), "--out", str(tmp_path / "run")]) == 0
    manifest = read_artifact(tmp_path / "run" / "export", ActorsManifest)
    assert 1500 not in seen and seen | {1500} <= set(manifest.seen_seeds)
    assert manifest.fixed_stages.seen_seeds == sorted(seen)
