"""`unexrl train` for real: torchrun with two gloo ranks (sharded tables, DCP checkpoints, export), a rank killed
with SIGKILL and the run resumed, and every algorithm in one plain process."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from tests.conftest import training_set_args
from unexrl.cli import main
from unexrl.config import ALGOS, Config
from unexrl.contracts.actors import ActorsManifest
from unexrl.contracts.artifact import read_artifact
from unexrl.rl.actors import load_actor_policy
from unexrl.sim.env import Simulator
from unexrl.train.checkpoint import _check_same_table_training, resumed_session_index
from unexrl.train.export import probe_actions

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config", str(ROOT / "configs" / "small.yaml")]
TINY = [
    "train.updates=20",
    "train.warmup_sessions=32",
    "train.sessions_per_collect=8",
    "train.updates_per_collect=10",
    "train.eval_sessions=20",
    "train.buffer_size=2000",
    "algo.batch_size=32",
    "algo.hidden=32",
    "algo.actor_start=0",
]  # the actors move from the first update, so there is something to export and compare
TORCHRUN = [
    str(Path(sys.executable).with_name("torchrun")),
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "unexrl",
    "--",
]


@pytest.fixture(autouse=True)
def _one_thread(single_thread: Callable[[], AbstractContextManager[None]]) -> Iterator[None]:
    with single_thread():  # for in-process runs; torchrun gives each worker one thread itself
        yield


def _args(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def _torchrun(args: list[str]) -> subprocess.Popen[str]:
    # `--` ends torchrun's own options: it would read --logs as an abbreviation of its --logs-specs
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*TORCHRUN, "train", *SMALL, *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finished(run: Path, proc: subprocess.Popen[str], timeout: float = 300) -> dict:
    """Judge a run by what it wrote (docs/training.md): a verified export and a complete curve.

    A nonzero exit is accepted only as the known abort at interpreter exit after distributed training."""
    output, _ = proc.communicate(timeout=timeout)
    assert (run / "curve.json").is_file(), output[-4000:]
    if proc.returncode != 0:
        assert "SIGABRT" in output, output[-4000:]
    read_artifact(run / "export", ActorsManifest)  # every file's sha256
    return json.loads((run / "curve.json").read_text())


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory, cem_artifact: Path, train_logs: Path) -> Path:
    run = tmp_path_factory.mktemp("dist") / "run"
    proc = _torchrun(
        [
            # the compiled update (train.compile), on sharded tables
            *_args([*TINY, "train.checkpoint_every=10", "train.compile=true"]),
            "--algo",
            "unexrl-cic",
            "--logs",
            str(train_logs),
            *training_set_args(train_logs),
            "--cem",
            str(cem_artifact),
            "--out",
            str(run),
        ]
    )
    curve = _finished(run, proc)
    assert curve["updates"] == 20 and curve["world_size"] == 2
    return run


def test_two_ranks_write_sharded_checkpoints(offline_run: Path) -> None:
    checkpoints = sorted((offline_run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000010", "step-00000020"]
    files = {f.name for f in checkpoints[-1].iterdir()}
    # each rank wrote its shards and its RNG state; the progress record is written last
    assert {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "rng-rank0.pt",
        "rng-rank1.pt",
        "progress.json",
    } <= files
    assert json.loads((checkpoints[-1] / "progress.json").read_text())["updates"] == 20


def test_export_loads_in_one_process_and_acts_like_the_sharded_model(
    offline_run: Path, train_logs: Path
) -> None:
    manifest = read_artifact(offline_run / "export", ActorsManifest)
    assert manifest.kind == "actors" and manifest.algorithm == "unexrl-cic"
    assert manifest.training.world_size == 2
    assert all("on ranks [0, 1]" in placement for placement in manifest.training.sharding.values())
    logs = json.loads((train_logs / "manifest.json").read_text())
    assert manifest.training_data.regime == "offline"
    assert manifest.training_data.sha256 == {k: v["sha256"] for k, v in logs["files"].items()}

    cfg = Config.model_validate_json(json.dumps(manifest.config))
    sim = Simulator(cfg)
    served = probe_actions(load_actor_policy(offline_run / "export", cfg, sim.world), sim)
    sharded = load_file(offline_run / "probe_actions.safetensors")
    assert len(served) == len(cfg.cascade.stages) == len(sharded)
    for i, action in enumerate(served):
        torch.testing.assert_close(action, sharded[f"stage{i}"], rtol=0, atol=1e-6)
    # trained actors, not the CEM weights of fixed stages: actions vary across requests
    assert float(served[-1].std(0).max()) > 0


def _worker(parent: int, rank: int) -> int:
    """PID of torchrun's worker process with the given RANK."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {parent}")


def test_killed_rank_resumes_to_the_same_update_count(tmp_path: Path, cem_artifact: Path) -> None:
    run = tmp_path / "run"
    overrides = [*TINY, "train.updates=40", "train.checkpoint_every=10", "train.eval_every=10"]
    args = [*_args(overrides), "--algo", "unexrl-cic", "--cem", str(cem_artifact), "--out", str(run)]
    proc = _torchrun(args)
    first = run / "checkpoints" / "step-00000010" / "progress.json"
    deadline = time.monotonic() + 240
    while not first.is_file():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.05)
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-4000:]
    assert not (run / "curve.json").exists(), "the run finished before the kill: nothing was tested"
    done = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    killed_at = int(done[-1].removeprefix("step-"))
    assert 10 <= killed_at < 40

    curve = _finished(run, _torchrun([*args, "--resume"]))
    assert curve["updates"] == 40 and curve["resumed_from"] == killed_at
    points = curve["curve"]
    assert [p["updates"] for p in points] == list(
        range(10, 41, 10)
    )  # the points before the kill were restored
    watch = [p["validation_watch_time"] for p in points]
    assert all(math.isfinite(v) and v > 0 for v in watch)
    assert 0.1 < watch[-1] / watch[0] < 10, watch  # comparable: the resumed run did not blow up or collapse
    assert read_artifact(run / "export", ActorsManifest).training.resumed_from == killed_at


def test_a_resume_at_another_world_size_reuses_no_session_id() -> None:
    """Session ids are index * world_size + rank: a run resumed on fewer or more ranks starts past every id the
    saved ranks used, and skips less than one round of ids."""
    for n, saved, now in ((100, 4, 1), (7, 2, 3), (0, 2, 1), (5, 1, 2), (9, 3, 3)):
        used = {k * saved + r for k in range(n) for r in range(saved)}
        start = resumed_session_index(n, saved, now)
        new = {k * now + r for k in range(start, start + 50) for r in range(now)}
        assert not used & new and start * now < n * saved + now, (n, saved, now)


@pytest.mark.parametrize("algo", ALGOS)
def test_single_process_train_for_every_algorithm(
    algo: str, tmp_path: Path, cem_artifact: Path, train_logs: Path
) -> None:
    """No torchrun: one process, nothing sharded. unexrl-cic trains online, the rest offline from logs."""
    data = [] if algo == "unexrl-cic" else ["--logs", str(train_logs), *training_set_args(train_logs)]
    overrides = [*TINY, "train.updates=8", "train.eval_sessions=8", "train.warmup_sessions=16"]
    assert (
        main(
            [
                "train",
                *SMALL,
                *_args(overrides),
                "--algo",
                algo,
                "--cem",
                str(cem_artifact),
                *data,
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert (
        curve["updates"] == 8
        and curve["world_size"] == 1
        and curve["regime"] == ("online" if not data else "offline")
    )
    point = curve["curve"][-1]
    assert all(math.isfinite(v) for k, v in point.items() if k != "diagnostics" and v is not None)
    assert math.isfinite(
        point["diagnostics"]["gradient"]["cosine"]["mean"]
    )  # diagnosed at the validation point
    manifest = read_artifact(
        tmp_path / "export", ActorsManifest
    )  # published only after it reloaded and matched the probe
    assert manifest.algorithm == algo
    assert manifest.learning_stages == ([2] if algo in ("td3", "ddpg") else [0, 1, 2])


def _ddpg_run(out: Path, cem: Path, updates: int) -> list[str]:
    """The arguments of a tiny one-process DDPG run into ``out``."""
    overrides = [*TINY, f"train.updates={updates}", "train.eval_sessions=4", "train.warmup_sessions=8"]
    return ["train", *SMALL, *_args(overrides), "--algo", "ddpg", "--cem", str(cem), "--out", str(out)]


def test_a_second_run_into_the_same_directory_needs_resume(
    tmp_path: Path, cem_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _ddpg_run(tmp_path, cem_artifact, updates=2)
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished: resumes at the end and exports again
    assert json.loads((tmp_path / "curve.json").read_text())["resumed_from"] == 2
    capsys.readouterr()
    # a resume reads the checkpoints with the run's own config: another discount would misread them
    assert main([*args, "--set", "algo.gamma=0.9", "--resume"]) == 2
    assert "was trained with other algo settings" in capsys.readouterr().err
    # the training loop's own settings may change, and where the feature store is
    assert main([*args, "--set", "train.updates=3", "--resume"]) == 0
    assert json.loads((tmp_path / "curve.json").read_text())["updates"] == 3
    assert main([*args, "--set", "features.repo=elsewhere", "--set", "train.updates=3", "--resume"]) == 0
    # its tables trained in this process (RowWiseAdagrad): torchrun, which shards them and trains them fused, refuses
    # its checkpoint instead of failing on missing keys or restarting the accumulators
    step = max((tmp_path / "checkpoints").glob("step-*"))
    saved = set(dcp.FileSystemReader(step).read_metadata().state_dict_metadata)
    _check_same_table_training(step, saved, sharded=False, in_process=True)
    with pytest.raises(RuntimeError, match="trained in one process cannot resume under torchrun"):
        _check_same_table_training(step, saved, sharded=True, in_process=False)


def test_offline_resume_is_exact(tmp_path: Path, cem_artifact: Path, train_logs: Path) -> None:
    """Offline, the buffer comes back from the logs, so a run resumed from its middle checkpoint must end where the
    uninterrupted run ended: networks, targets, Adam states, RNG and CQR knots all restored (one process)."""
    # train.select=best_validation (the default): the best point's actors are in the checkpoint, so the resumed
    # run selects among every point, as the uninterrupted one did
    overrides = [
        *TINY,
        "train.updates=8",
        "train.checkpoint_every=4",
        "train.eval_every=4",
        "train.eval_sessions=4",
    ]
    args = [
        *_args(overrides),
        "--algo",
        "unexrl-cic",
        "--logs",
        str(train_logs),
        *training_set_args(train_logs),
    ]
    args += ["--cem", str(cem_artifact)]
    assert main(["train", *SMALL, *args, "--out", str(tmp_path / "whole")]) == 0
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "whole" / "checkpoints" / "step-00000004",
        tmp_path / "cut" / "checkpoints" / "step-00000004",
    )
    assert main(["train", *SMALL, *args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / r / "curve.json").read_text()) for r in ("whole", "cut"))
    for point in (*whole["curve"], *cut["curve"]):
        point["diagnostics"].pop("seconds")  # the only thing the resume may change: how long they took
    assert cut["resumed_from"] == 4 and cut["curve"] == whole["curve"]
    assert cut["selected_updates"] == whole["selected_updates"]
    assert (tmp_path / "whole" / "export" / "actors.safetensors").read_bytes() == (
        tmp_path / "cut" / "export" / "actors.safetensors"
    ).read_bytes()


def test_export_holds_the_best_validation_point(tmp_path: Path, cem_artifact: Path, train_logs: Path) -> None:
    """Model selection on seeds.validation: the export holds the actors of the best point of the curve."""
    overrides = [*TINY, "train.updates=12", "train.eval_every=3", "train.eval_sessions=8"]
    assert (
        main(
            [
                "train",
                *SMALL,
                *_args(overrides),
                "--algo",
                "unexrl-cic",
                "--logs",
                str(train_logs),
                *training_set_args(train_logs),
                "--cem",
                str(cem_artifact),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    points = json.loads((tmp_path / "curve.json").read_text())["curve"]
    best = max(points, key=lambda p: p["validation_watch_time"])
    manifest = read_artifact(tmp_path / "export", ActorsManifest)
    assert manifest.selection.model_dump() == {
        "rule": "best_validation",
        "updates": best["updates"],
        "validation_watch_time": best["validation_watch_time"],
    }
    cfg = Config.model_validate_json(json.dumps(manifest.config))
    sim = Simulator(cfg)
    served = probe_actions(load_actor_policy(tmp_path / "export", cfg, sim.world), sim)
    final = load_file(tmp_path / "probe_actions.safetensors")
    same = all(torch.equal(a, final[f"stage{i}"]) for i, a in enumerate(served))
    assert same == (best["updates"] == 12)  # the final actors only when the last point is the best


def _payload(ran: Path) -> bytes:
    """A pickle that creates the file ``ran`` when it is unpickled: what a forged DCP .metadata could do."""
    import pickle

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(ran), "w"))

    return pickle.dumps(Payload())


@pytest.fixture
def checkpointed(tmp_path: Path, cem_artifact: Path) -> tuple[list[str], Path]:
    """A finished tiny run with checkpoints, and the arguments that resume it."""
    args = _ddpg_run(tmp_path, cem_artifact, updates=4)
    assert main(args) == 0
    return [*args, "--resume"], max((tmp_path / "checkpoints").glob("step-*"))


def test_a_tampered_checkpoint_is_refused_before_anything_is_unpickled(
    checkpointed: tuple[list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attack: a DCP .metadata that runs code when unpickled. The hash check refuses it unread."""
    resume, step = checkpointed
    ran = tmp_path / "the-payload-ran"
    (step / ".metadata").write_bytes(_payload(ran))
    assert main(resume) == 2
    assert ".metadata" in capsys.readouterr().err and not ran.exists()


@pytest.mark.parametrize("attack", ["extra file", "no manifest", "unsigned for a signing trainer"])
def test_checkpoints_not_written_by_this_trainer_are_refused(
    checkpointed: tuple[list[str], Path],
    tmp_path: Path,
    attack: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from unexrl.contracts.signing import ENV_SIGNING_KEY, generate_keys

    resume, step = checkpointed
    expected = {
        "extra file": "not in the manifest",
        "no manifest": "no manifest.json",
        "unsigned for a signing trainer": "no manifest.sig",
    }[attack]
    if attack == "extra file":
        (step / "__2_0.distcp").write_bytes(b"\0")
    elif attack == "no manifest":
        (step / "manifest.json").unlink()
    else:
        private, _ = generate_keys(tmp_path / "keys")
        monkeypatch.setenv(ENV_SIGNING_KEY, str(private))
    assert main(resume) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", [".metadata", "__0_0.distcp", "progress.json", "rng-rank0.pt", "best-actors.safetensors"]
)
def test_a_checkpoint_file_replaced_after_verification_is_never_loaded(
    checkpointed: tuple[list[str], Path],
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every file of a checkpoint, DCP's included, is parsed from the bytes its hash is checked on: one swapped
    right after the directory verified (for DCP's pickled .metadata, a payload that would write a file) is refused,
    not loaded."""
    from unexrl.train import checkpoint

    resume, step = checkpointed
    assert (step / name).is_file()
    ran = tmp_path / "the-payload-ran"
    verify = checkpoint.verify_checkpoint

    def verify_then_swap(path: Path) -> Any:
        manifest = verify(path)
        data = (path / name).read_bytes()
        swapped = _payload(ran) if name == ".metadata" else data[:-1] + bytes([data[-1] ^ 1])
        (path / name).write_bytes(swapped)
        return manifest

    monkeypatch.setattr(checkpoint, "verify_checkpoint", verify_then_swap)
    assert main(resume) == 2
    assert f"{name}: sha256" in capsys.readouterr().err and not ran.exists()


def test_a_signing_trainer_resumes_its_own_checkpoints(
    tmp_path: Path, cem_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unexrl.contracts.signing import ENV_SIGNING_KEY, generate_keys

    private, _ = generate_keys(tmp_path / "keys")
    monkeypatch.setenv(ENV_SIGNING_KEY, str(private))
    out = tmp_path / "run"
    args = _ddpg_run(out, cem_artifact, updates=4)
    assert main(args) == 0
    assert (max((out / "checkpoints").glob("step-*")) / "manifest.sig").is_file()
    assert (out / "export" / "manifest.sig").is_file()  # the exported actors are signed too
    assert main([*args, "--resume"]) == 0
