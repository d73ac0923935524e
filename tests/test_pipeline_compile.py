"""The compiled pipeline: checked-in YAML and Kubernetes manifests are current, and the cluster settings are in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.continuous_training import (
    GPU_NODE_SELECTOR,
    GPU_TOLERATIONS,
    MANIFESTS_YAML,
    PIPELINE_YAML,
    SERVING_REGISTRY_MOUNT,
    SIGNING_MOUNT,
    version_name,
)
from unexrl.gitops import ENV_GIT_TOKEN

ROOT = Path(__file__).resolve().parents[1]


def docs(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def test_checked_in_yaml_is_current(tmp_path: Path) -> None:
    """Recompile and compare the parsed documents (the header comment's dict order varies between runs). In a
    process of its own without UNEXRL_IMAGE_REGISTRY: the components read it when imported, and the checked-in
    YAML names the default registry whatever the shell running the tests points at."""
    env = {k: v for k, v in os.environ.items() if k != "UNEXRL_IMAGE_REGISTRY"}
    subprocess.run(
        [sys.executable, "-m", "pipelines.continuous_training", "--compile"]
        + ["--pipeline-yaml", str(tmp_path / "p.yaml"), "--manifests-yaml", str(tmp_path / "m.yaml")],
        cwd=ROOT,
        env=env,
        check=True,
    )
    assert docs(tmp_path / "p.yaml") == docs(PIPELINE_YAML), (
        "stale: run `python -m pipelines.continuous_training --compile`"
    )
    assert docs(tmp_path / "m.yaml") == docs(MANIFESTS_YAML), (
        "stale: run `python -m pipelines.continuous_training --compile`"
    )


def test_train_task_runs_on_gpu_nodes_with_the_data_pvc() -> None:
    spec, platform = docs(PIPELINE_YAML)
    executor = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    accel = executor["resources"]["accelerator"]
    assert accel["resourceType"] == "{{$.inputs.parameters['pipelinechannel--gpu_type']}}"
    assert accel["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
    assert executor["image"].endswith("/unexrl-train-gpu:0.1.0")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "gpu_node_selector"
    assert k8s["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "gpu_tolerations"
    assert k8s["pvcMount"][0]["mountPath"] == "/data"
    assert k8s["pvcMount"][0]["pvcNameParameter"]["componentInputParameter"] == "data_pvc"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["defaultValue"] == GPU_NODE_SELECTOR
    assert params["gpu_tolerations"]["defaultValue"] == GPU_TOLERATIONS
    assert params["data_pvc"]["defaultValue"] == "unexrl-data"
    train = spec["root"]["dag"]["tasks"]["train"]
    assert train["retryPolicy"]["maxRetryCount"] == 1


def test_materialize_publishes_the_registry_on_the_serving_registry_pvc() -> None:
    """The materialize task mounts serving_registry_pvc where serving_registry points (the serving pods mount the
    same volume there: tests/test_k8s.py) and holds the signing key, so staging and prod can require a signature."""
    spec, platform = docs(PIPELINE_YAML)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-materialize-features"]
    (mount,) = k8s["pvcMount"]
    assert mount["pvcNameParameter"]["componentInputParameter"] == "serving_registry_pvc"
    params = spec["root"]["inputDefinitions"]["parameters"]
    # not published by default: a run on another online store than serving's must not move serving's registry
    # (each environment's recurring run sets it: tests/test_k8s.py)
    assert params["serving_registry"]["defaultValue"] == ""
    assert mount["mountPath"] == SERVING_REGISTRY_MOUNT
    task = spec["root"]["dag"]["tasks"]["materialize-features"]
    assert task["inputs"]["parameters"]["serving_registry"]["componentInputParameter"] == "serving_registry"
    assert [v["mountPath"] for v in k8s["secretAsVolume"]] == [SIGNING_MOUNT]


def test_gate_condition_guards_package_and_deploy() -> None:
    spec, _ = docs(PIPELINE_YAML)
    tasks = spec["root"]["dag"]["tasks"]
    cond = tasks["condition-1"]
    assert (
        cond["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    )
    assert "gate" in cond["dependentTasks"]
    inner = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"package", "deploy"}
    assert "package" not in tasks and "deploy" not in tasks
    assert not tasks["gate"]["cachingOptions"].get("enableCache", False)  # the registry may have moved on
    assert tasks["build-features"]["cachingOptions"]["enableCache"] is True
    # the logs at one logs_uri change between runs under the same string: never reused from a cache
    assert not tasks["ingest-logs"]["cachingOptions"].get("enableCache", False)


def test_kubernetes_manifests() -> None:
    pipeline, version = docs(MANIFESTS_YAML)
    assert (pipeline["kind"], version["kind"]) == ("Pipeline", "PipelineVersion")
    assert version["spec"]["pipelineName"] == pipeline["metadata"]["name"] == "unexrl-continuous-training"
    assert version["metadata"]["namespace"] == "kubeflow"
    # KFP refuses a new spec under an existing PipelineVersion: the name follows the spec, not VERSION alone
    assert version["metadata"]["name"] == version_name(PIPELINE_YAML)
    assert (
        "exec-train"
        in version["spec"]["platformSpec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    )


def test_deploy_reads_the_gitops_token_from_an_optional_secret() -> None:
    _, platform = docs(PIPELINE_YAML)
    deploy = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-deploy"]
    (secret,) = deploy["secretAsEnv"]
    assert (
        secret["keyToEnv"] == [{"envVar": ENV_GIT_TOKEN, "secretKey": "token"}] and secret["optional"] is True
    )
    assert secret["secretNameParameter"]["componentInputParameter"] == "pipelinechannel--gitops_secret"


def test_a_changed_spec_is_a_new_pipeline_version(tmp_path: Path) -> None:
    spec, platform = docs(PIPELINE_YAML)
    changed = tmp_path / "p.yaml"
    changed.write_text(yaml.safe_dump_all([spec | {"sdkVersion": "another"}, platform]))
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump_all([spec, platform]))  # another layout, the same spec
    assert version_name(same) == version_name(PIPELINE_YAML) != version_name(changed)


def test_every_parameter_is_described_for_the_ui() -> None:
    spec, _ = docs(PIPELINE_YAML)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"config", "environment", "min_uplift_pct", "train_workers", "gpu_type"} <= set(params)
    assert [name for name, p in params.items() if len(p.get("description", "")) < 15] == []


def test_every_component_input_is_described_and_named_as_in_the_pipeline() -> None:
    """Docstring ``Args:`` become input descriptions in the compiled YAML (what the Kubeflow UI shows), and a
    component parameter that carries a pipeline parameter has the pipeline parameter's name."""
    spec, _ = docs(PIPELINE_YAML)
    pipeline_params = set(spec["root"]["inputDefinitions"]["parameters"])
    undescribed = []
    for name, component in spec["components"].items():
        inputs = component.get("inputDefinitions", {})
        for kind in ("parameters", "artifacts"):
            undescribed += [
                f"{name}.{i}"
                for i, d in inputs.get(kind, {}).items()
                if not d.get("description") and "pipelinechannel" not in i
            ]
    assert not undescribed, f"inputs without a description: {undescribed}"
    renamed = []
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    for task_name, task in ((n, t) for dag in dags for n, t in dag["tasks"].items()):
        for param, value in task.get("inputs", {}).get("parameters", {}).items():
            source = value.get("componentInputParameter", "").removeprefix("pipelinechannel--")
            if not param.startswith("pipelinechannel--") and source in pipeline_params and source != param:
                renamed.append(f"{task_name}.{param} <- {source}")
    assert not renamed, f"parameters renamed between the pipeline and a component: {renamed}"
    assert {"config_overrides", "data_pvc", "gitops_repo"} <= set(
        spec["components"]["comp-train"]["inputDefinitions"]["parameters"]
    ) | set(spec["components"]["comp-deploy"]["inputDefinitions"]["parameters"])


def test_the_tasks_that_write_policy_artifacts_sign_them() -> None:
    """simulate-logs (CEM) and train (the candidate) get the optional signing Secret and the env naming its key."""
    spec, platform = docs(PIPELINE_YAML)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-simulate-logs", "exec-train"):
        (volume,) = executors[name]["secretAsVolume"]
        assert (volume["secretName"], volume["optional"]) == ("unexrl-artifact-signing-key", True)
        env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][name]["container"]["env"]}
        assert env["UNEXRL_SIGNING_KEY_FILE"] == f"{volume['mountPath']}/private.pem"
