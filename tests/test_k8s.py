"""Offline validation of k8s/: every overlay renders with `kubectl kustomize`; core kinds validate against the
Kubernetes API schema (kubernetes-validate, pinned version); custom resources against the fields their
controllers require; security and contract invariants of the serving stack; the dashboard and the rules.

No cluster is needed. kubectl (with its built-in kustomize) must be on PATH; without it these tests skip.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
ENVS = ("dev", "staging", "prod")
SERVING = [f"overlays/{e}" for e in ENVS]
PLATFORM = [f"overlays/{e}/platform" for e in ENVS]
ALL = [*SERVING, *PLATFORM, "argocd"]
K8S_VERSION = "1.32.0"  # the API version validated against: kubectl 1.32 on these machines
SERVING_RULES = (
    "model_version:unexrl_session_watch_time_seconds:mean5m",
    "model_version:unexrl_recommend_latency_seconds:p99_5m",
)
# API groups whose kinds kubernetes-validate knows (the rest are custom resources, checked below).
CORE_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io"}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
pytestmark = needs_kubectl


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize k8s/{path} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def group(doc: dict) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a workload (Deployment, CronJob, TrainingRuntime...)."""
    return [spec for _, spec in pod_templates(doc)]


def load_kustomization(path: str) -> dict:
    return yaml.safe_load((K8S / path / "kustomization.yaml").read_text())


# ---------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("path", ALL)
def test_every_overlay_renders_with_names_and_namespaces(path):
    docs = render(path)
    assert docs
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate objects"
    if path != "argocd":
        env = path.split("/")[1]
        ns = load_kustomization(path)["namespace"]
        assert ns == {"dev": "unexrl-dev", "staging": "unexrl-staging", "prod": "unexrl"}[env]
        assert {d["metadata"].get("namespace") for d in docs} == {ns}


@pytest.mark.parametrize("path", ALL)
def test_core_kinds_validate_against_kubernetes_schema(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for doc in render(path):
        if group(doc) in CORE_GROUPS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked or path == "argocd"


def test_trainjob_example_validates():
    job = yaml.safe_load((K8S / "base/training/trainjob-example.yaml").read_text())
    check_custom(job)


# ----------------------------------------------------------------------------------------- custom resources


def require(doc: dict, *paths: str) -> None:
    for path in paths:
        node = doc
        for key in path.split("."):
            assert isinstance(node, dict) and node.get(key) not in (None, "", [], {}), (
                f"{doc['kind']} {doc['metadata'].get('name', '')}: missing {path}"
            )
            node = node[key]


def check_pod_template_containers(doc: dict) -> None:
    specs = pod_specs(doc)
    assert specs, f"{doc['kind']}: no pod template"
    for spec in specs:
        for c in spec["containers"]:
            require(c, "name", "image")


def check_custom(doc: dict) -> None:
    kind, api = doc["kind"], doc["apiVersion"]
    require(doc, "apiVersion", "kind")
    assert doc.get("metadata", {}).get("name") or doc.get("metadata", {}).get("generateName"), "no name"
    if kind == "Rollout":
        assert api == "argoproj.io/v1alpha1"
        require(doc, "spec.selector.matchLabels", "spec.strategy.canary.steps")
        ref = doc["spec"].get("workloadRef")
        assert ref or doc["spec"].get("template"), "Rollout needs spec.template or spec.workloadRef"
        if ref:
            require(ref, "apiVersion", "kind", "name")
            assert ref.get("scaleDown", "never") in {"never", "onsuccess", "progressively"}
        for step in doc["spec"]["strategy"]["canary"]["steps"]:
            assert len(step) == 1 and next(iter(step)) in {
                "setWeight",
                "pause",
                "analysis",
                "setCanaryScale",
                "experiment",
                "setHeaderRoute",
                "setMirrorRoute",
                "plugin",
            }, step
            if "setWeight" in step:
                assert 0 <= step["setWeight"] <= 100
            if "analysis" in step:
                assert all(t.get("templateName") for t in step["analysis"]["templates"])
    elif kind == "AnalysisTemplate":
        assert api == "argoproj.io/v1alpha1"
        require(doc, "spec.metrics")
        declared = {a["name"] for a in doc["spec"].get("args", [])}
        for m in doc["spec"]["metrics"]:
            require(m, "name", "provider")
            assert m.get("successCondition") or m.get("failureCondition"), m["name"]
            if "prometheus" in m["provider"]:
                require(m["provider"]["prometheus"], "address", "query")
            used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", json.dumps(m)))
            assert used <= declared, f"{m['name']} uses undeclared args {used - declared}"
    elif kind == "Application":
        assert api == "argoproj.io/v1alpha1"
        require(
            doc,
            "spec.project",
            "spec.source.repoURL",
            "spec.source.path",
            "spec.source.targetRevision",
            "spec.destination.namespace",
        )
        dest = doc["spec"]["destination"]
        assert bool(dest.get("server")) != bool(dest.get("name")), (
            "destination needs exactly one of server/name"
        )
    elif kind == "AppProject":
        require(doc, "spec.sourceRepos", "spec.destinations")
    elif kind == "ServiceMonitor":
        assert api == "monitoring.coreos.com/v1"
        require(doc, "spec.selector", "spec.endpoints")
        for ep in doc["spec"]["endpoints"]:
            assert ep.get("port") or ep.get("targetPort"), "endpoint needs port"
    elif kind == "PrometheusRule":
        assert api == "monitoring.coreos.com/v1"
        require(doc, "spec.groups")
        for g in doc["spec"]["groups"]:
            require(g, "name", "rules")
            for r in g["rules"]:
                assert bool(r.get("record")) != bool(r.get("alert")) and r.get("expr"), r
    elif kind in {"TrainingRuntime", "ClusterTrainingRuntime"}:
        assert api == "trainer.kubeflow.org/v1alpha1"
        require(doc, "spec.template.spec.replicatedJobs")
        for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
            require(job, "name", "template.spec.template.spec.containers")
        check_pod_template_containers(doc)
    elif kind == "TrainJob":
        assert api == "trainer.kubeflow.org/v1alpha1"
        require(doc, "spec.runtimeRef.name")
        assert doc["spec"]["runtimeRef"].get("kind", "ClusterTrainingRuntime") in {
            "TrainingRuntime",
            "ClusterTrainingRuntime",
        }
    elif kind == "PyTorchJob":
        assert api == "kubeflow.org/v1"
        require(doc, "spec.pytorchReplicaSpecs")
    elif kind == "Pipeline":
        assert api == "pipelines.kubeflow.org/v2beta1"
        require(doc, "spec.displayName")
    elif kind == "PipelineVersion":
        assert api == "pipelines.kubeflow.org/v2beta1"
        require(
            doc,
            "spec.pipelineName",
            "spec.pipelineSpec.pipelineInfo.name",
            "spec.pipelineSpec.root",
            "spec.pipelineSpec.schemaVersion",
        )
    else:
        raise AssertionError(f"no validation for custom resource {api} {kind}")


@pytest.mark.parametrize("path", ALL)
def test_custom_resources_have_required_fields(path):
    for doc in render(path):
        if group(doc) not in CORE_GROUPS:
            check_custom(doc)


def test_each_environment_has_every_kind():
    expected_serving = {
        "Deployment",
        "Rollout",
        "AnalysisTemplate",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    }
    expected_platform = {
        "TrainingRuntime",
        "CronJob",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "ConfigMap",
        "NetworkPolicy",
        "Pipeline",
        "PipelineVersion",
    }
    for env in ENVS:
        assert expected_serving <= {d["kind"] for d in render(f"overlays/{env}")}
        assert expected_platform <= {d["kind"] for d in render(f"overlays/{env}/platform")}
    apps = find(render("argocd"), "Application")
    assert sorted(a["spec"]["source"]["path"] for a in apps) == sorted(f"k8s/{p}" for p in SERVING + PLATFORM)
    for a in apps:
        assert (ROOT / a["spec"]["source"]["path"] / "kustomization.yaml").is_file()
        ns = load_kustomization(a["spec"]["source"]["path"].removeprefix("k8s/"))["namespace"]
        assert a["spec"]["destination"]["namespace"] == ns


# ------------------------------------------------------------------------------------- serving invariants


@pytest.mark.parametrize("env", ENVS)
def test_serving_workload_is_hardened_and_probed(env):
    docs = render(f"overlays/{env}")
    dep = one(docs, "Deployment", "unexrl-serving")
    spec = dep["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount", "unexrl-serving")["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for key in ("cpu", "memory"):
        assert c["resources"]["requests"][key] and c["resources"]["limits"][key]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
    env_names = {e["name"] for e in c["env"]}
    assert {"UNEXRL_MODEL", "UNEXRL_MODEL_VERSION"} <= env_names
    # The model version is the pod template's annotation, and the model tag is derived from it.
    version_env = next(e for e in c["env"] if e["name"] == "UNEXRL_MODEL_VERSION")
    assert (
        version_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['unexrl.io/model-version']"
    )
    version = load_kustomization(f"overlays/{env}")["commonAnnotations"]["unexrl.io/model-version"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["unexrl.io/model-version"] == version
    # Argo Rollouts owns the pods; HPA scales the Rollout; the PDB covers the pods.
    rollout = one(docs, "Rollout", "unexrl-serving")
    assert rollout["spec"]["workloadRef"]["name"] == "unexrl-serving" and dep["spec"]["replicas"] == 0
    assert rollout["metadata"]["annotations"]["unexrl.io/model-version"] == version
    # No traffic router: clients reach every pod through unexrl-serving, one the Rollout never narrows to a side
    # (through the stable Service the canary would get no traffic and its analysis no data).
    canary = rollout["spec"]["strategy"]["canary"]
    assert "trafficRouting" not in canary
    managed = {canary["stableService"], canary["canaryService"]}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert managed <= services.keys() and "unexrl-serving" not in managed
    assert services["unexrl-serving"]["spec"]["selector"] == {"app.kubernetes.io/name": "unexrl-serving"}
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "name": "unexrl-serving",
    }
    labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["minReplicas"] >= 1
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every drain"


@pytest.mark.parametrize("env", ENVS)
def test_only_ingress_and_prometheus_reach_serving(env):
    docs = render(f"overlays/{env}")
    (pol,) = [
        p
        for p in find(docs, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "unexrl-serving"
    ]
    assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # egress: DNS, and the online store's port only
    dns, store = pol["spec"]["egress"]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {p["port"] for p in dns["ports"]} == {53}
    assert "to" not in store and [p["port"] for p in store["ports"]] == [6379]
    peers = []
    for rule in pol["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [3000]
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector", "podSelector"}, "each peer must name namespace and pods"
            peers.append(
                (
                    peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                    peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
                )
            )
    assert sorted(peers) == [("ingress-nginx", "ingress-nginx"), ("monitoring", "prometheus")]


@pytest.mark.parametrize("path", ALL)
def test_secrets_only_by_reference(path):
    docs = render(path)
    assert not find(docs, "Secret"), "no Secret objects in git"
    secretish = re.compile(r"(PASSWORD|TOKEN|SECRET|CREDENTIAL|ACCESS_KEY|API_KEY)", re.IGNORECASE)
    for doc in docs:
        for spec in pod_specs(doc):
            for c in spec["containers"] + spec.get("initContainers", []):
                for e in c.get("env", []):
                    if secretish.search(e["name"]) and "value" in e:
                        # A path to a projected token file is not a secret.
                        assert e["value"].startswith("/var/run/secrets/"), f"{e['name']} set inline"
        for cm in find([doc], "ConfigMap"):
            for key, value in (cm.get("data") or {}).items():
                assert not re.search(r"password=|://[^/\s:]+:[^@\s]+@", str(value)), (
                    f"{key}: credentials inline"
                )


def test_serving_reads_the_published_registry_and_redis_from_a_secret():
    """Every environment's serving pods open the `serving` Feast environment: Redis from a Secret (the in-cluster
    one in dev, a managed one in staging and prod) through the registry the recurring run's materialize step
    publishes on a volume of its own, mounted read-only; every ${VAR} of that environment is provided."""
    from pipelines.continuous_training import SERVING_REGISTRY_MOUNT

    def feature_env(docs):
        cm = next(
            c for c in find(docs, "ConfigMap") if c["metadata"]["name"].startswith("unexrl-feature-store")
        )
        dep = one(docs, "Deployment", "unexrl-serving")
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert [r["configMapRef"]["name"] for r in c["envFrom"]] == [cm["metadata"]["name"]]
        return cm["data"], {e["name"]: e for e in c["env"]}, pod, c

    settings = yaml.safe_load((ROOT / "feature_repo/environments/serving.yaml").read_text())
    wanted = set(re.findall(r"\$\{(\w+)\}", json.dumps(settings)))
    for env_name, secret in (
        ("dev", "feast-redis"),
        ("staging", "unexrl-feast-online-store"),
        ("prod", "unexrl-feast-online-store"),
    ):
        data, env, pod, container = feature_env(render(f"overlays/{env_name}"))
        assert data["UNEXRL_FEATURE_ENV"] == "serving" and "UNEXRL_REDIS" not in data
        assert data["UNEXRL_SESSION_STORE"] == "redis"  # replicas share sessions: no affinity needed
        assert env["UNEXRL_REDIS"]["valueFrom"]["secretKeyRef"] == {
            "name": secret,
            "key": "connection-string",
        }
        assert wanted <= set(data) | set(env)
        # the registry file is where the recurring run publishes it: serving_registry on serving_registry_pvc,
        # mounted at the same path in the materialize task and, read-only, in the serving pods
        params = kfp_params(env_name)
        assert "features.environment=redis" in params["config_overrides"]
        published = params["serving_registry"]
        claim = params.get("serving_registry_pvc", pipeline_default("serving_registry_pvc"))
        assert data["UNEXRL_FEAST_REGISTRY"] == published
        (mount,) = [m for m in container["volumeMounts"] if published.startswith(m["mountPath"] + "/")]
        assert mount["mountPath"] == SERVING_REGISTRY_MOUNT and mount["readOnly"] and "subPath" not in mount
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        assert one(render(f"overlays/{env_name}/platform"), "PersistentVolumeClaim", claim)
    dev_platform = render("overlays/dev/platform")
    redis = one(dev_platform, "Deployment", "feast-redis")
    assert one(dev_platform, "Service", "feast-redis")["spec"]["ports"][0]["port"] == 6379
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    # a password from the Secret, protected mode left on, and the probe authenticates
    command = " ".join(container["command"] + container["args"])
    assert '--requirepass "$REDIS_PASSWORD"' in command and "protected-mode" not in command
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        (e,) = [e for e in container["env"] if e["name"] == name]
        assert e["valueFrom"]["secretKeyRef"] == {"name": "feast-redis", "key": "password"}
    for env_name in ("staging", "prod"):
        assert not find(render(f"overlays/{env_name}/platform"), "Deployment", "feast-redis")


def pod_templates(doc: dict) -> list[tuple[dict, dict]]:
    """(labels, pod spec) of every pod template inside a workload."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            spec = node.get("spec")
            if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
                out.append(((node.get("metadata") or {}).get("labels") or {}, spec))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc.get("spec", {}))
    return out


def selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    expressions = selector.get("matchExpressions", [])
    return selector.get("matchLabels", {}).items() <= labels.items() and all(
        e["operator"] == "In" and labels.get(e["key"]) in e["values"] for e in expressions
    )


@pytest.mark.parametrize("path", [*SERVING, *PLATFORM])
def test_every_pod_has_ingress_and_egress_policies(path):
    """Every pod template of every overlay is selected by a NetworkPolicy that restricts both directions."""
    docs = render(path)
    policies = find(docs, "NetworkPolicy")
    for doc in docs:
        for labels, _ in pod_templates(doc):
            mine = [p for p in policies if selects(p, labels)]
            assert mine, f"{doc['kind']} {doc['metadata']['name']}: no NetworkPolicy selects {labels}"
            assert {"Ingress", "Egress"} <= {t for p in mine for t in p["spec"]["policyTypes"]}, labels
    # the KFP component pods are not in these manifests (KFP creates them): their policy names KFP's label
    if path in PLATFORM:
        assert any(selects(p, {"pipelines.kubeflow.org/v2_component": "true"}) for p in policies)


@pytest.mark.parametrize("env", ENVS)
def test_the_api_token_is_a_secret_reference(env):
    dep = one(render(f"overlays/{env}"), "Deployment", "unexrl-serving")
    (e,) = [
        e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "UNEXRL_API_TOKEN"
    ]
    assert e["valueFrom"]["secretKeyRef"] == {"name": "unexrl-api-token", "key": "token"}


@pytest.mark.parametrize("env", ENVS)
def test_staging_and_prod_serve_only_signed_artifacts(env):
    """The service's trusted public keys come from a ConfigMap in staging and prod (signatures required), and
    are absent in dev (the embedded default's rule); the trainer signs with an optional Secret everywhere."""
    spec = one(render(f"overlays/{env}"), "Deployment", "unexrl-serving")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    keys = [e for e in container["env"] if e["name"] == "UNEXRL_ARTIFACT_PUBLIC_KEYS"]
    if env == "dev":
        assert not keys
    else:
        (mount,) = [m for m in container["volumeMounts"] if keys[0]["value"].startswith(m["mountPath"] + "/")]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == "unexrl-artifact-public-keys" and mount["readOnly"]
    runtime = one(render(f"overlays/{env}/platform"), "TrainingRuntime")
    (pod,) = [p for p in pod_specs(runtime)]
    env_vars = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    key_dir = env_vars["UNEXRL_SIGNING_KEY_FILE"].rsplit("/", 1)[0]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == key_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": "unexrl-artifact-signing-key", "optional": True}


@pytest.mark.parametrize("env", ENVS)
def test_training_runtime_targets_gpus_with_nccl(env):
    from unexrl.pipeline.launcher import TRAINING_RUNTIME

    # the runtime the pipeline's TrainJobs name is this one, with the job and container their overrides target
    rt = one(render(f"overlays/{env}/platform"), "TrainingRuntime", TRAINING_RUNTIME)
    (job,) = rt["spec"]["template"]["spec"]["replicatedJobs"]
    assert (
        job["name"] == "node"
        and job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == "node"
    )
    assert rt["spec"]["mlPolicy"]["torch"]
    (spec,) = pod_specs(rt)
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert {e["name"] for e in c["env"]} >= {"NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
    assert c["image"].endswith(
        "/unexrl-train-gpu:"
        + next(
            i["newTag"]
            for i in load_kustomization(f"overlays/{env}/platform")["images"]
            if i["name"] == "unexrl-train-gpu"
        )
    )
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"]), "/dev/shm for NCCL"
    assert c["command"] == ["torchrun"] and c["args"][:3] == ["-m", "unexrl", "--"]


def kfp_params(env: str) -> dict:
    """The pipeline parameters of the environment's recurring run (its CronJob's KFP_PARAMS)."""
    cron = one(render(f"overlays/{env}/platform"), "CronJob", "unexrl-continuous-training")
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return json.loads(next(e["value"] for e in c["env"] if e["name"] == "KFP_PARAMS"))


def pipeline_default(name: str) -> object:
    """A parameter's default in the compiled pipeline."""
    compiled = next(yaml.safe_load_all((ROOT / "pipelines" / "unexrl_continuous_training.yaml").read_text()))
    return compiled["root"]["inputDefinitions"]["parameters"][name]["defaultValue"]


@pytest.mark.parametrize("env", ENVS)
def test_recurring_run_starts_the_continuous_training_pipeline(env):
    from unexrl.pipeline.launcher import TRAINING_RUNTIME

    docs = render(f"overlays/{env}/platform")
    cron = one(docs, "CronJob", "unexrl-continuous-training")
    spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    values = {e["name"]: e.get("value") for e in c["env"]}
    assert values["KFP_PIPELINE"] == "unexrl-continuous-training" and values["KFP_HOST"]
    # the run's parameters: what a run needs to train here and deploy into this overlay, all of them the pipeline's
    params = json.loads(values["KFP_PARAMS"])
    compiled = next(yaml.safe_load_all((ROOT / "pipelines" / "unexrl_continuous_training.yaml").read_text()))
    assert set(params) <= set(compiled["root"]["inputDefinitions"]["parameters"])
    assert params["environment"] == env
    # Argo CD syncs main into staging and prod: their deploy commits go to a branch that a person merges
    assert (params.get("gitops_branch", "main") == "main") is (env == "dev")
    # a multi-node job runs the training image this overlay pins for the runtime, not the pipeline's default
    (runtime,) = pod_specs(one(docs, "TrainingRuntime", TRAINING_RUNTIME))
    assert params["train_image"] == runtime["containers"][0]["image"]
    # the feature steps write the online store this environment's serving pods read, with the same Secret
    assert "features.environment=redis" in params["config_overrides"]
    serving = one(render(f"overlays/{env}"), "Deployment", "unexrl-serving")
    (container,) = serving["spec"]["template"]["spec"]["containers"]
    redis = next(e for e in container["env"] if e["name"] == "UNEXRL_REDIS")["valueFrom"]["secretKeyRef"]
    assert (redis["name"], redis["key"]) == (params["feature_store_secret"], "connection-string")
    assert params["namespace"] == cron["metadata"]["namespace"]  # where the TrainingRuntime is
    assert one(docs, "PersistentVolumeClaim", params["data_pvc"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert spec["automountServiceAccountToken"] is False
    scripts = next(v for v in spec["volumes"] if v["name"] == "scripts")["configMap"]["name"]
    cm = one(docs, "ConfigMap", scripts)
    assert cm["data"]["start_run.py"] == (K8S / "base/pipelines/start_run.py").read_text()
    assert cron["spec"].get("suspend", False) is (env == "dev")


def test_start_run_picks_the_declared_version():
    import importlib.util
    from types import SimpleNamespace as NS

    spec = importlib.util.spec_from_file_location("start_run", K8S / "base/pipelines/start_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    versions = [
        NS(display_name="v1", created_at=1, pipeline_version_id="a"),
        NS(display_name="v2", created_at=2, pipeline_version_id="b"),
    ]
    assert mod.choose_version(versions, "").pipeline_version_id == "b"
    assert mod.choose_version(versions, "v1").pipeline_version_id == "a"
    with pytest.raises(LookupError):
        mod.choose_version(versions, "v3")

    class Pages:  # the KFP API's list, 100 versions a page
        def list_pipeline_versions(self, pipeline_id: str, page_token: str, page_size: int) -> NS:
            start = int(page_token or 0)
            every = [NS(display_name=f"v{i}", created_at=i, pipeline_version_id=str(i)) for i in range(250)]
            more = start + page_size < len(every)
            return NS(
                pipeline_versions=every[start : start + page_size],
                next_page_token=str(start + page_size) if more else "",
            )

    assert mod.choose_version(mod.all_versions(Pages(), "p"), "").display_name == "v249"

    class Listing:  # the KFP API's pipeline list: shared pipelines unless a namespace is named
        def list_pipelines(self, filter: str, namespace: str | None) -> NS:
            (predicate,) = json.loads(filter)["predicates"]
            found = namespace == "unexrl" and predicate["stringValue"] == "unexrl-continuous-training"
            return NS(pipelines=[NS(pipeline_id="id-1")] if found else None)

    assert mod.pipeline_id(Listing(), "unexrl-continuous-training", "unexrl") == "id-1"
    assert mod.pipeline_id(Listing(), "unexrl-continuous-training", None) is None


# ---------------------------------------------------------------------------------------------- monitoring


def rendered_rules(env: str = "prod") -> dict:
    return one(render(f"overlays/{env}"), "PrometheusRule")


def test_promtool_check_rules_on_rendered_rules(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    for env in ENVS:
        path = tmp_path / f"{env}.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": rendered_rules(env)["spec"]["groups"]}))
        done = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    records = {r.get("record") for g in rendered_rules()["spec"]["groups"] for r in g["rules"]}
    assert set(SERVING_RULES) <= records


def test_analysis_queries_the_serving_recording_rules():
    tmpl = one(render("overlays/prod"), "AnalysisTemplate", "unexrl-canary")
    queries = {m["name"]: m["provider"]["prometheus"]["query"] for m in tmpl["spec"]["metrics"]}
    reward = queries["long-term-reward-vs-stable"]
    assert SERVING_RULES[0] in reward and 'model_version="{{args.canary-version}}"' in reward
    assert 'model_version!="{{args.canary-version}}"' in reward
    assert SERVING_RULES[1] in queries["p99-latency"]
    for m in tmpl["spec"]["metrics"]:
        assert m.get("failureLimit", 0) == 0, "one failed measurement must abort the rollout"
    rollout = one(render("overlays/prod"), "Rollout")
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    analyses = [s["analysis"] for s in steps if "analysis" in s]
    assert analyses and all(a["templates"] == [{"templateName": "unexrl-canary"}] for a in analyses)
    for a in analyses:
        (arg,) = a["args"]
        assert arg["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['unexrl.io/model-version']"


def _session_series(
    version: str, watch_per_minute: float, sessions_per_minute: float, served: bool = True, minutes: int = 20
) -> list[dict]:
    """A version's ended sessions and their watch time (its shares of them) over ``minutes``, for promtool; with
    the model info a replica serving it exports, unless it is no longer ``served`` (only its sessions' last
    pages are still counted, on the other version's pods)."""
    counters = [
        {"series": f'{name}{{model_version="{version}"}}', "values": f"0+{step}x{minutes}"}
        for name, step in (
            ("unexrl_session_watch_time_seconds_total", watch_per_minute),
            ("unexrl_sessions_ended_total", sessions_per_minute),
        )
    ]
    info = {
        "series": f'unexrl_model_info{{model_version="{version}",role="stable"}}',
        "values": f"1x{minutes}",
    }
    return counters + ([info] if served else [])


def _promtool_test(tmp_path: Path, tests: list[dict]) -> None:
    """Run ``tests`` (promtool's unit-test cases) on the shipped rules."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rendered_rules()["spec"]["groups"]}))
    spec = tmp_path / "rules.test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}))
    done = subprocess.run(
        [promtool, "test", "rules", spec.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_reward_analysis_passes_fails_and_waits_as_documented(tmp_path):
    """The canary's reward query on the shipped recording rules (promtool test rules): 1 at 99% of the stable's
    mean watch time, 0 at 90%, and no result (inconclusive, not a failure) when the canary or every other version
    ended no session in the window, whose 0/0 mean is NaN, or the stable's sessions watched nothing (a ratio to
    0 measures nothing; its +Inf passed any canary). A version no replica serves any more is not the stable one,
    however well its last sessions did."""
    tmpl = one(render("overlays/prod"), "AnalysisTemplate", "unexrl-canary")
    (metric,) = [m for m in tmpl["spec"]["metrics"] if m["name"] == "long-term-reward-vs-stable"]
    ratio = next(a["value"] for a in tmpl["spec"]["args"] if a["name"] == "min-reward-ratio")
    query = metric["provider"]["prometheus"]["query"].replace("{{args.min-reward-ratio}}", ratio)

    def expect(canary: str, value: int | None) -> dict:
        samples = [] if value is None else [{"labels": "{}", "value": value}]
        expr = query.replace("{{args.canary-version}}", canary)
        return {"expr": expr, "eval_time": "15m", "exp_samples": samples}

    tests = [
        {
            "interval": "1m",
            "input_series": _session_series("stable", 1000, 1)
            + _session_series("better", 990, 1)
            + _session_series("worse", 900, 1)
            + _session_series("idle", 0, 0)
            + _session_series("retired", 2000, 0.5, served=False),
            "promql_expr_test": [expect("better", 1), expect("worse", 0), expect("idle", None)],
        },
        {
            "interval": "1m",
            "input_series": _session_series("stable", 0, 0) + _session_series("canary", 900, 1),
            "promql_expr_test": [expect("canary", None)],
        },
        {
            "interval": "1m",
            "input_series": _session_series("stable", 0, 1) + _session_series("canary", 900, 1),
            "promql_expr_test": [expect("canary", None)],
        },
    ]
    _promtool_test(tmp_path, tests)


def test_no_sessions_alert_fires_for_a_served_version_only(tmp_path):
    """A served version whose sessions stop ending raises UnexrlNoSessionsEnding; a version no replica serves any
    more, whose counters the remaining pods keep at a rate of 0, does not."""
    quiet = _session_series("stable", 0, 0, minutes=40) + _session_series(
        "gone", 0, 0, served=False, minutes=40
    )
    labels = {"model_version": "stable", "severity": "ticket"}
    tests = [
        {
            "interval": "1m",
            "input_series": quiet,
            "alert_rule_test": [
                {
                    "eval_time": "30m",
                    "alertname": "UnexrlNoSessionsEnding",
                    "exp_alerts": [
                        {
                            "exp_labels": labels,
                            "exp_annotations": {
                                "summary": "model stable: no session ended for 15 minutes (feedback not arriving?)"
                            },
                        }
                    ],
                }
            ],
        }
    ]
    _promtool_test(tmp_path, tests)


def dashboard_exprs(dashboard: dict) -> list[str]:
    out = []

    def panels(node):
        for p in node.get("panels", []):
            yield p
            yield from panels(p)  # rows nest panels

    for p in panels(dashboard):
        out += [t["expr"] for t in p.get("targets", []) if t.get("expr")]
    return out


def test_dashboard_configmap_is_the_dashboard_file_byte_for_byte(tmp_path):
    source = (K8S / "monitoring/dashboard.json").read_text()
    dashboard = json.loads(source)
    exprs = dashboard_exprs(dashboard)
    assert exprs, "the dashboard has no panel queries"
    for env in ENVS:
        cm = one(render(f"overlays/{env}"), "ConfigMap", "unexrl-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"] == {"unexrl-serving.json": source}
    # Every panel query is valid PromQL (checked by promtool as recording rules; Grafana's interval variables
    # replaced by a duration) and uses only unexrl metrics or their recording rules.
    promtool = shutil.which("promtool")
    if promtool:
        rules = [
            {
                "record": f"dashboard:panel_{i}",
                "expr": re.sub(r"\$(__rate_interval|__interval|__range)\b", "5m", e),
            }
            for i, e in enumerate(exprs)
        ]
        path = tmp_path / "panels.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
        done = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    for e in exprs:
        names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{|\[|\)|$)", e)) - {"by", "without", "le"}
        assert any(n.startswith("unexrl_") or ":unexrl_" in n for n in names), e


# -------------------------------------------------------------------------------------- overlay contract


@pytest.mark.parametrize("env", ENVS)
def test_overlay_carries_the_deploy_fields(env):
    k = load_kustomization(f"overlays/{env}")
    (image,) = [i for i in k["images"] if i["name"] == "unexrl-serving"]
    assert set(image) == {"name", "newName", "newTag"}
    assert set(k["commonAnnotations"]) == {"unexrl.io/model-version"}
    dep = one(render(f"overlays/{env}"), "Deployment", "unexrl-serving")
    assert (
        dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"
    )
    # the base refers to the serving image by the bare name the overlay replaces
    base = yaml.safe_load((K8S / "base/serving/deployment.yaml").read_text())
    assert base["spec"]["template"]["spec"]["containers"][0]["image"] == "unexrl-serving"


@pytest.mark.parametrize("path", [*SERVING, *PLATFORM])
def test_every_pod_is_restricted(path):
    """checkov does not see inside custom resources (TrainingRuntime): check every pod template here."""
    for doc in render(path):
        for spec in pod_specs(doc):
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            assert spec.get("automountServiceAccountToken") is False, name
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
                assert sc["capabilities"]["drop"] == ["ALL"], name
                assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"], name


def test_pipeline_manifests_are_the_compiled_ones():
    compiled = ROOT / "pipelines/manifests/unexrl_continuous_training.k8s.yaml"
    assert (
        K8S / "base/pipelines/unexrl_continuous_training.k8s.yaml"
    ).read_bytes() == compiled.read_bytes(), (
        "stale copy: cp pipelines/manifests/unexrl_continuous_training.k8s.yaml k8s/base/pipelines/"
    )
    for env in ENVS:
        docs = render(f"overlays/{env}/platform")
        pipeline = one(docs, "Pipeline")
        version = one(docs, "PipelineVersion")
        assert pipeline["metadata"]["name"] == "unexrl-continuous-training"
        assert version["spec"]["pipelineName"] == pipeline["metadata"]["name"]
        cron = one(docs, "CronJob", "unexrl-continuous-training")
        (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        assert {e["name"]: e.get("value") for e in c["env"]}["KFP_PIPELINE"] == pipeline["metadata"]["name"]
