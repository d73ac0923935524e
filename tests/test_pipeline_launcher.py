"""The multi-node training launcher without a cluster: rendered TrainJob / PyTorchJob manifests, and the polling
logic replayed over status sequences (tests/data/k8s, written from the API types, not recorded from a cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unexrl.pipeline import launcher
from unexrl.pipeline.launcher import (
    JobSpec,
    TrainingFailed,
    job_state,
    render,
    torchrun_command,
    wait_for_job,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "k8s"


def spec(**kw) -> JobSpec:
    base = {
        "name": "unexrl-train-x",
        "namespace": "kubeflow",
        "image": "ghcr.io/unexrl/unexrl-train-gpu:0.1.0",
        "args": ["train", "--config", "/data/c.yaml", "--out", "/data/run"],
        "nodes": 3,
        "gpus_per_node": 8,
        "pvc": "unexrl-data",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    return JobSpec(**(base | kw))


def replay(name: str):
    """A ``get`` that returns the recorded objects one per call, and a sleep that counts polls."""
    objects = json.loads((DATA / name).read_text())
    calls = {"get": 0, "sleep": 0}

    def get():
        obj = objects[min(calls["get"], len(objects) - 1)]
        calls["get"] += 1
        return obj

    def sleep(_s: float) -> None:
        calls["sleep"] += 1

    return get, sleep, calls


def test_trainjob_manifest() -> None:
    m = render("trainjob", spec())
    assert (m["apiVersion"], m["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    t = m["spec"]["trainer"]
    # the project's own runtime (k8s/base/training), not Kubeflow's default: its pods are the hardened ones
    assert m["spec"]["runtimeRef"] == {
        "name": "unexrl-torchrec",
        "kind": "TrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    assert (t["numNodes"], t["numProcPerNode"], t["resourcesPerNode"]["limits"]) == (
        3,
        8,
        {"nvidia.com/gpu": 8},
    )
    assert t["command"] == ["torchrun", "-m", "unexrl", "--"] and t["args"][0] == "train"
    over = m["spec"]["podTemplateOverrides"][0]
    assert over["targetJobs"] == [{"name": "node"}]
    assert over["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert over["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert over["spec"]["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "unexrl-data"}}
    ]
    assert over["spec"]["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]


def test_pytorchjob_manifest() -> None:
    m = render("pytorchjob", spec())
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = m["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert m["spec"]["nprocPerNode"] == "8"
    template = replicas["Worker"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == "ghcr.io/unexrl/unexrl-train-gpu:0.1.0"
    assert container["command"] == ["torchrun", "-m", "unexrl", "--"] and container["args"][0] == "train"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"} and pod["tolerations"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "unexrl-data"}} in pod["volumes"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert "Worker" not in render("pytorchjob", spec(nodes=1))["spec"]["pytorchReplicaSpecs"]
    # another accelerator replaces the runtime's GPU request rather than adding to it
    amd = render("pytorchjob", spec(gpu_resource="amd.com/gpu"))["spec"]["pytorchReplicaSpecs"]["Master"]
    (container,) = amd["template"]["spec"]["containers"]
    assert {k for k in container["resources"]["limits"] if k.endswith("/gpu")} == {"amd.com/gpu"}
    assert {k for k in container["resources"]["requests"] if k.endswith("/gpu")} == {"amd.com/gpu"}
    # nor does it inherit the runtime's NVIDIA placement: only the job's (here none)
    bare = render("pytorchjob", spec(gpu_resource="amd.com/gpu", node_selector={}, tolerations=[]))
    pod = bare["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {} and pod["tolerations"] == []


def test_a_pytorchjob_runs_the_training_runtimes_hardened_pod() -> None:
    """The PyTorchJob is not a second, weaker pod: service account, security contexts, the NetworkPolicy's label,
    NCCL environment, shared memory, scratch and signing key are the TrainingRuntime's (k8s/base/training)."""
    runtime = yaml.safe_load((ROOT / "k8s" / "base" / "training" / "trainingruntime.yaml").read_text())
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    hardened = node["template"]["spec"]["template"]
    (want,) = hardened["spec"]["containers"]
    for role in ("Master", "Worker"):
        template = render("pytorchjob", spec())["spec"]["pytorchReplicaSpecs"][role]["template"]
        pod = template["spec"]
        (container,) = pod["containers"]
        assert template["metadata"]["labels"] == hardened["metadata"]["labels"]
        for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext"):
            assert pod[key] == hardened["spec"][key], key
        assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"] == want["securityContext"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["env"] == want["env"]
        assert all(v in pod["volumes"] for v in hardened["spec"]["volumes"])
        assert all(m in container["volumeMounts"] for m in want["volumeMounts"])


def test_bad_job_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="job kind"):
        render("mpijob", spec())
    with pytest.raises(ValueError, match="nodes=0"):
        spec(nodes=0)
    with pytest.raises(ValueError, match="PVC"):
        spec(pvc="")


@pytest.mark.parametrize(
    "name,kind,polls",
    [("trainjob_complete.json", "trainjob", 4), ("pytorchjob_succeeded.json", "pytorchjob", 4)],
)
def test_wait_until_success(name: str, kind: str, polls: int) -> None:
    get, sleep, calls = replay(name)
    obj = wait_for_job(kind, get, poll_s=1, sleep=sleep)
    assert job_state(kind, obj)[0] == "succeeded"
    assert calls["get"] == polls and calls["sleep"] == polls - 1  # a Restarting PyTorchJob is not finished


@pytest.mark.parametrize(
    "name,kind,message",
    [
        ("trainjob_failed.json", "trainjob", "BackoffLimitExceeded"),
        ("pytorchjob_failed.json", "pytorchjob", "Master replica"),
    ],
)
def test_wait_raises_on_failure(name: str, kind: str, message: str) -> None:
    get, sleep, _ = replay(name)
    with pytest.raises(TrainingFailed, match=message):
        wait_for_job(kind, get, poll_s=1, sleep=sleep)


def test_wait_times_out_and_survives_api_errors() -> None:
    now = [0.0]
    answers = iter([ConnectionError("apiserver unavailable"), {"status": {}}, ConnectionError("again")] * 10)

    def get():
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(TrainingFailed, match=r"did not finish within 100 s"):
        wait_for_job("trainjob", get, poll_s=30, timeout_s=100, sleep=sleep, clock=lambda: now[0])

    def down():
        raise ConnectionError("apiserver unavailable")

    with pytest.raises(TrainingFailed, match=r"within 100 s \(last error: apiserver unavailable\)"):
        wait_for_job("trainjob", down, poll_s=30, timeout_s=100, sleep=sleep, clock=lambda: now[0])


def test_torchrun_command() -> None:
    cmd = torchrun_command(2, ["train", "--logs", "L"])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "unexrl",
        "--",
        "train",
        "--logs",
        "L",
    ]
    assert torchrun_command(1, ["train"])[1:] == ["-m", "unexrl", "train"]
    with pytest.raises(ValueError):
        torchrun_command(0, [])


def test_the_run_dir_is_handed_to_the_runtimes_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launching task running as root (KFP's default) creates the run directory; the job's pods, which run as
    the runtime's user, must be able to write it (fsGroup does not reach an NFS volume)."""
    chowned = []
    monkeypatch.setattr(launcher.os, "geteuid", lambda: 0)
    monkeypatch.setattr(launcher.os, "chown", lambda path, uid, gid: chowned.append((path, uid, gid)))
    run_dir = launcher.prepare_run_dir(tmp_path / "shared" / "run")
    context = launcher.runtime_pod_template()["spec"]["securityContext"]
    assert run_dir.is_dir() and chowned == [(run_dir, context["runAsUser"], context["runAsGroup"])] == [
        (run_dir, 1000, 1000)
    ]
