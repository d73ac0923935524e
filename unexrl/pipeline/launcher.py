"""Launching `unexrl train`: torchrun on this machine, or a multi-node Kubeflow TrainJob / PyTorchJob in a cluster.

Upstream has no KFP component that submits a training job and waits for it, so this module renders the job,
submits it through the Kubernetes API (kubernetes.client.CustomObjectsApi), polls its status conditions and
returns when it finished. The rendering and the status interpretation are pure functions; the polling loop takes
the ``get`` call as a parameter so it is tested against recorded status objects without a cluster.

Success is judged by the run's files, not only the exit code: a rare SIGABRT at interpreter exit after distributed
training is known (docs/training.md); a run whose export verifies and whose curve.json reports every update is
complete whatever the exit status.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unexrl.bundle import training_runtime_file
from unexrl.config import Config
from unexrl.contracts import files
from unexrl.contracts.base import ContractError
from unexrl.contracts.training import TrainingSummary

log = logging.getLogger(__name__)

JOB_KINDS = ("trainjob", "pytorchjob")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
TRAINING_RUNTIME = "unexrl-torchrec"
"""the TrainingRuntime a TrainJob runs on: k8s/base/training/trainingruntime.yaml, in the job's namespace (its pods
carry the trainers' NetworkPolicy label, service account, non-root security context and signing key)"""


RUNTIME_GPU_RESOURCE = "nvidia.com/gpu"
"""the accelerator resource the TrainingRuntime's pod requests; a job names its own (``JobSpec.gpu_resource``)"""


class TrainingFailed(RuntimeError):
    """The training run or job ended without a complete export."""


# -- local ------------------------------------------------------------------------------------------------------


def torchrun_command(processes: int, args: list[str]) -> list[str]:
    """``python -m unexrl train ...`` for one process, else torchrun with ``processes`` workers on this machine.

    The ``--`` keeps torchrun from taking abbreviated unexrl options (--logs) for its own (docs/training.md).
    """
    if processes < 1:
        raise ValueError(f"training processes: {processes}, need at least 1")
    if processes == 1:
        return [sys.executable, "-m", "unexrl", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "unexrl",
        "--",
        *args,
    ]


def run_checked(command: list[str], run_dir: Path, env: dict[str, str] | None = None) -> int:
    """Run a training command; a nonzero exit is accepted only as SIGABRT at exit with a complete run directory."""
    here = str(Path(__file__).resolve().parents[2])  # the child imports the same unexrl as this process
    path = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        # a pod's log is not a terminal: one progress line per 30 s instead of one per update
        "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "30"),
        **(env or {}),
    }
    log.info("launch: %s", " ".join(command))
    done = subprocess.run(command, env=env, check=False)  # the exit code alone does not decide
    if done.returncode == 0:
        return 0
    # torchrun reports a worker's SIGABRT at exit as 1, one process as -6: judge by the files (check_complete)
    if (run_dir / files.CURVE).is_file() and (run_dir / "export" / files.MANIFEST).is_file():
        log.warning("training exited with %s after writing its run files; judged by them", done.returncode)
        return done.returncode
    raise TrainingFailed(f"training exited with {done.returncode} and left no complete run in {run_dir}")


def check_complete(run_dir: Path, cfg: Config) -> TrainingSummary:
    """curve.json reports ``train.updates`` and the export verifies (every file's sha256); returns curve.json."""
    from unexrl.contracts.artifact import read_artifact

    curve = run_dir / files.CURVE
    if not curve.is_file():
        raise TrainingFailed(f"{run_dir}: no curve.json; the run did not finish")
    try:
        summary = TrainingSummary.read(curve)
    except ContractError as err:
        raise TrainingFailed(str(err)) from None
    if summary.updates != cfg.train.updates:
        raise TrainingFailed(f"{run_dir}: {summary.updates} updates of {cfg.train.updates}")
    read_artifact(run_dir / "export")
    return summary


# -- cluster: rendering -----------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """What a multi-node training job needs; every field lands in the rendered manifest."""

    name: str
    namespace: str
    image: str
    args: list[str]
    """arguments after ``python -m unexrl``: train --config ... --out <PVC path>"""
    nodes: int
    gpus_per_node: int
    pvc: str
    mount_path: str = "/data"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    gpu_resource: str = RUNTIME_GPU_RESOURCE

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"job {self.name}: nodes={self.nodes}, gpus_per_node={self.gpus_per_node}; need >= 1"
            )
        if not self.pvc:
            raise ValueError(f"job {self.name}: a PVC is needed (logs in, run directory out)")


def render(kind: str, spec: JobSpec) -> dict[str, Any]:
    """The custom resource for ``kind``: ``trainjob`` (Kubeflow Trainer v2) or ``pytorchjob`` (training-operator v1)."""
    if kind == "trainjob":
        return render_trainjob(spec)
    if kind == "pytorchjob":
        return render_pytorchjob(spec)
    raise ValueError(f"job kind {kind!r}: expected one of {JOB_KINDS}")


def _volume(spec: JobSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        {"name": "data", "persistentVolumeClaim": {"claimName": spec.pvc}},
        {"name": "data", "mountPath": spec.mount_path},
    )


def render_trainjob(spec: JobSpec) -> dict[str, Any]:
    """A TrainJob on our TrainingRuntime (``TRAINING_RUNTIME``): the runtime runs torchrun on every node with
    numProcPerNode processes and sets the rendezvous; we add image, command, GPUs and placement."""
    volume, mount = _volume(spec)
    return {
        "apiVersion": f"{TRAINJOB[0]}/{TRAINJOB[1]}",
        "kind": "TrainJob",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "unexrl"},
        },
        "spec": {
            "runtimeRef": {
                "name": TRAINING_RUNTIME,
                "kind": "TrainingRuntime",
                "apiGroup": TRAINJOB[0],
            },
            "trainer": {
                "image": spec.image,
                "command": ["torchrun", "-m", "unexrl", "--"],
                "args": spec.args,
                "numNodes": spec.nodes,
                "numProcPerNode": spec.gpus_per_node,
                "resourcesPerNode": {"limits": {spec.gpu_resource: spec.gpus_per_node}},
            },
            "podTemplateOverrides": [
                {
                    "targetJobs": [{"name": "node"}],
                    "spec": {
                        "nodeSelector": spec.node_selector,
                        "tolerations": spec.tolerations,
                        "volumes": [volume],
                        "containers": [{"name": "node", "volumeMounts": [mount]}],
                    },
                }
            ],
        },
    }


def runtime_pod_template() -> dict[str, Any]:
    """The pod template of the TrainingRuntime (``TRAINING_RUNTIME``, bundled with the package): service account,
    security contexts, NCCL environment, shared memory, scratch, run volume and signing key."""
    runtime = yaml.safe_load(training_runtime_file().read_text())
    if runtime["metadata"]["name"] != TRAINING_RUNTIME:
        raise ValueError(
            f"{training_runtime_file()}: TrainingRuntime {runtime['metadata']['name']!r}, not {TRAINING_RUNTIME}"
        )
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return node["template"]["spec"]["template"]


def render_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """A PyTorchJob: one Master and nodes-1 Workers; the operator sets torchrun's rendezvous environment. Its pods
    are the TrainingRuntime's (``runtime_pod_template``), so either kind runs as the same hardened pod, with the
    job's image, arguments, GPUs, placement and data volume in place of the runtime's defaults."""
    volume, mount = _volume(spec)
    gpus = {spec.gpu_resource: spec.gpus_per_node}
    template = runtime_pod_template()

    def replicas(n: int) -> dict[str, Any]:
        pod = copy.deepcopy(template)
        (container,) = pod["spec"]["containers"]
        container |= {
            "name": "pytorch",  # the operator finds the training container by this name
            "image": spec.image,
            "command": ["torchrun", "-m", "unexrl", "--"],
            "args": spec.args,
            "volumeMounts": [*container.get("volumeMounts", []), mount],
        }
        resources = container.setdefault("resources", {})
        for bound in ("requests", "limits"):  # the job's accelerators in place of the runtime's
            kept = {k: v for k, v in resources.get(bound, {}).items() if k != RUNTIME_GPU_RESOURCE}
            resources[bound] = kept | gpus
        pod["spec"]["volumes"] = [*pod["spec"].get("volumes", []), volume]
        # the runtime's placement is for its accelerator: another one takes only the job's
        own = spec.gpu_resource == RUNTIME_GPU_RESOURCE
        pod["spec"]["nodeSelector"] = spec.node_selector or (
            pod["spec"].get("nodeSelector", {}) if own else {}
        )
        pod["spec"]["tolerations"] = spec.tolerations or (pod["spec"].get("tolerations", []) if own else [])
        return {"replicas": n, "restartPolicy": "OnFailure", "template": pod}

    specs = {"Master": replicas(1)}
    if spec.nodes > 1:
        specs["Worker"] = replicas(spec.nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB[0]}/{PYTORCHJOB[1]}",
        "kind": "PyTorchJob",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "unexrl"},
        },
        "spec": {
            "nprocPerNode": str(spec.gpus_per_node),
            "runPolicy": {"backoffLimit": 2, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": specs,
        },
    }


# -- cluster: status --------------------------------------------------------------------------------------------


def job_state(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(``running`` | ``succeeded`` | ``failed``, message) from a job's status conditions.

    TrainJob: condition ``Complete`` or ``Failed`` with status "True". PyTorchJob: ``Succeeded`` or ``Failed``
    (``Created``, ``Running``, ``Restarting`` mean not finished). A job without a status yet is running.
    """
    done = {"trainjob": "Complete", "pytorchjob": "Succeeded"}[kind]
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") == "Failed":
            return "failed", cond.get("message") or cond.get("reason") or "Failed"
        if cond.get("type") == done:
            return "succeeded", cond.get("message") or done
    return "running", ""


def wait_for_job(
    kind: str,
    get: Callable[[], dict[str, Any]],
    *,
    poll_s: float = 30.0,
    timeout_s: float = 86_400.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll ``get()`` (the job object) until it succeeds; raise TrainingFailed when it fails or times out.

    Transient API errors (``get`` raising) are retried until the timeout, like a not-yet-finished job.
    """
    deadline = clock() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            obj = get()
            last_error = None
            state, message = job_state(kind, obj)
            if state == "succeeded":
                return obj
            if state == "failed":
                raise TrainingFailed(f"{kind} {obj.get('metadata', {}).get('name')} failed: {message}")
        except TrainingFailed:
            raise
        except Exception as err:  # noqa: BLE001 (API server briefly unreachable: keep polling until the deadline)
            last_error = err
            log.warning("polling the %s failed (%s); retrying", kind, err)
        if clock() >= deadline:
            raise TrainingFailed(
                f"{kind} did not finish within {timeout_s:.0f} s"
                + (f" (last error: {last_error})" if last_error else "")
            )
        sleep(poll_s)


def submit_and_wait(
    kind: str, spec: JobSpec, *, poll_s: float = 30.0, timeout_s: float = 86_400.0
) -> dict[str, Any]:
    """Create the job with the in-cluster service account, wait for it, and return the final object."""
    from kubernetes import client, config

    config.load_incluster_config()
    api = client.CustomObjectsApi()
    group, version, plural = TRAINJOB if kind == "trainjob" else PYTORCHJOB
    body = render(kind, spec)
    api.create_namespaced_custom_object(group, version, spec.namespace, plural, body)
    log.info(
        "submitted %s %s/%s (%d nodes x %d GPUs)",
        kind,
        spec.namespace,
        spec.name,
        spec.nodes,
        spec.gpus_per_node,
    )
    return wait_for_job(
        kind,
        lambda: api.get_namespaced_custom_object(group, version, spec.namespace, plural, spec.name),
        poll_s=poll_s,
        timeout_s=timeout_s,
    )


def prepare_run_dir(run_dir: Path) -> Path:
    """Create ``run_dir`` on the shared volume for the job's pods, which run as the runtime's user: a launching
    task that runs as root (KFP's default) hands it to that user, since ``fsGroup`` does not reach shared
    filesystems such as NFS."""
    run_dir.mkdir(parents=True, exist_ok=True)
    context = runtime_pod_template()["spec"]["securityContext"]
    owner = (context["runAsUser"], context["runAsGroup"])
    if os.geteuid() == 0 and (run_dir.stat().st_uid, run_dir.stat().st_gid) != owner:
        try:
            os.chown(run_dir, *owner)
        except PermissionError as err:  # e.g. NFS with root_squash: root here is nobody there
            raise TrainingFailed(
                f"{run_dir}: cannot hand the run directory to the training pods' user {owner[0]}:{owner[1]} "
                f"({err}); export the volume without root_squash, or make it writable by that user"
            ) from None
    return run_dir


def stage_inputs(inputs: dict[str, Path], shared: Path) -> dict[str, Path]:
    """Copy the job's inputs (logs, training set, CEM artifact, config) onto the shared volume, where every node of
    the job sees them at the same path; KFP's artifact paths exist only inside the launching pod."""
    staged = {}
    for name, src in inputs.items():
        dst = shared / "inputs" / name
        if Path(src).is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
        staged[name] = dst
    return staged


def train_on_cluster(cfg: Config, *, kind: str, job: JobSpec, run_dir: Path, out: Path) -> TrainingSummary:
    """Multi-node training: submit ``job`` (its args write into ``run_dir`` on the shared PVC), wait, verify the run
    and publish its export to ``out``. Returns curve.json."""
    from unexrl.io import atomic_directory

    submit_and_wait(kind, job)
    summary = check_complete(run_dir, cfg)
    with atomic_directory(out, overwrite=True) as tmp:
        shutil.copytree(run_dir / "export", tmp, dirs_exist_ok=True)
    return summary
