"""`unexrl_continuous_training`: logs -> features -> training set -> train -> evaluate -> gate -> package -> deploy.

Compile (the checked-in YAML and manifests; tests/test_pipeline_compile.py fails when they are stale):

    python -m pipelines.continuous_training --compile

Run locally with kfp.local: `make run` (pipelines/local.py).
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes
from kfp.compiler.compiler_utils import KubernetesManifestOptions

from components import (
    build_features,
    build_training_set,
    deploy,
    evaluate,
    gate,
    ingest_logs,
    materialize_features,
    package,
    resolve_incumbent,
    simulate_logs,
    train,
)
from components.images import TRAIN_GPU_IMAGE, VERSION
from unexrl.contracts.signing import ENV_SIGNING_KEY
from unexrl.gitops import ENV_GIT_TOKEN
from unexrl.serve.sessions import ENV_REDIS

HERE = Path(__file__).resolve().parent
PIPELINE_YAML = HERE / "unexrl_continuous_training.yaml"
MANIFESTS_YAML = HERE / "manifests" / "unexrl_continuous_training.k8s.yaml"
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
DATA_MOUNT = (
    "/data"  # where data_pvc is mounted in the train, deploy and incumbent tasks (a compile-time path)
)
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
SERVING_REGISTRY_MOUNT = "/feast"
"""where serving_registry_pvc is mounted in materialize, and in the serving pods (k8s/base/serving/deployment.yaml)"""


def release_steps(
    *,
    config,
    config_overrides,
    evaluation_seeds,
    candidate,
    cem,
    incumbent,
    min_uplift_pct,
    latency_budget_ms,
    bentoml_home,
    gitops_repo,
    environment,
    gitops_branch,
    gitops_secret,
    registry,
    data_pvc,
) -> None:
    """evaluate -> gate -> dsl.If(passed): package -> deploy, added to the pipeline being defined.

    One definition of the release wiring, shared with the sabotage test (tests/test_pipeline_e2e.py), which feeds
    it a deliberately bad candidate.
    """
    evaluated = evaluate(
        config=config,
        config_overrides=config_overrides,
        evaluation_seeds=evaluation_seeds,
        candidate=candidate,
        cem=cem,
        incumbent=incumbent,
    )
    evaluated.set_display_name("evaluate vs incumbent and CEM")
    decision = gate(
        evaluation=evaluated.outputs["evaluation"],
        min_uplift_pct=min_uplift_pct,
        latency_budget_ms=latency_budget_ms,
    ).set_display_name("gate")
    decision.set_caching_options(False)

    with dsl.If(decision.outputs["Output"] == True, name="gate-passed"):
        bento = package(
            model=candidate, decision=decision.outputs["decision"], bentoml_home=bentoml_home
        ).set_display_name("package (BentoML)")
        released = deploy(
            bento=bento.outputs["bento"],
            model=candidate,
            gitops_repo=gitops_repo,
            environment=environment,
            gitops_branch=gitops_branch,
            registry=registry,
        )
        released.set_display_name("deploy (GitOps commit)").set_caching_options(False)
        released.set_retry(num_retries=2, backoff_duration="30s")  # git push races / network
        kubernetes.mount_pvc(released, pvc_name=data_pvc, mount_path=DATA_MOUNT)
        # the GitOps remote's token (key token), if it needs one: optional, a local path or an open remote needs none
        kubernetes.use_secret_as_env(
            released, secret_name=gitops_secret, secret_key_to_env={"token": ENV_GIT_TOKEN}, optional=True
        )


SIGNING_SECRET = "unexrl-artifact-signing-key"
SIGNING_MOUNT = "/etc/unexrl/signing"


def signs_artifacts(task: dsl.PipelineTask) -> None:
    """``task`` writes policy artifacts: it signs them with the environment's key, the Secret SIGNING_SECRET
    (key private.pem). Optional: dev has none and its service checks no signatures; staging and prod require
    them (k8s/components/signed-artifacts, docs/security.md)."""
    kubernetes.use_secret_as_volume(task, secret_name=SIGNING_SECRET, mount_path=SIGNING_MOUNT, optional=True)
    task.set_env_variable(ENV_SIGNING_KEY, f"{SIGNING_MOUNT}/private.pem")


FEATURE_WRITER_LABEL = ("unexrl.io/feature-writer", "true")
"""the label the online store's NetworkPolicy admits (k8s/base/feast-redis)"""


def reads_online_store(task: dsl.PipelineTask, secret) -> None:
    """``task`` opens the Feast store: with ``features.environment=redis`` it needs the online store's address,
    UNEXRL_REDIS, from the Secret ``secret`` (key connection-string, the serving pods' own; docs/deploy.md).
    Optional: the embedded default (SQLite) needs none."""
    kubernetes.use_secret_as_env(
        task, secret_name=secret, secret_key_to_env={"connection-string": ENV_REDIS}, optional=True
    )


@dsl.pipeline(
    name="unexrl-continuous-training",
    description="UNEX-RL continuous training: logs -> Feast features -> point-in-time training set -> distributed "
    "TorchRec training -> evaluation vs incumbent and CEM -> gate -> BentoML package -> GitOps deploy.",
)
def unexrl_continuous_training(
    config: str = "default",
    config_overrides: list = [],  # noqa: B006 (KFP parameters are declared by their defaults)
    environment: str = "staging",
    log_seed: int = -1,
    evaluation_seeds: list = [],  # noqa: B006
    logs_uri: str = "",
    algo: str = "unexrl-cic",
    train_nodes: int = 1,
    train_workers: int = 2,
    train_job_kind: str = "trainjob",
    train_image: str = TRAIN_GPU_IMAGE,
    gpu_type: str = "nvidia.com/gpu",
    gpus_per_node: int = 1,
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    gpu_tolerations: list = GPU_TOLERATIONS,
    namespace: str = "kubeflow",
    data_pvc: str = "unexrl-data",
    min_uplift_pct: float = 1.0,
    latency_budget_ms: float = 50.0,
    bentoml_home: str = "",
    gitops_repo: str = "",
    gitops_branch: str = "main",
    registry: str = "/data/registry",
    serving_registry: str = "",
    serving_registry_pvc: str = "unexrl-feast-registry",
    feature_store_secret: str = "unexrl-feast-online-store",
    gitops_secret: str = "unexrl-gitops-token",
):
    """UNEX-RL continuous training (README: "The continuous-training pipeline on a Kubeflow cluster").

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path inside the image.
        config_overrides: --set items applied in every step, e.g. ["device=cuda", "train.updates=5000"].
        environment: Deployment target: overlay k8s/overlays/<environment>/ and the registry entry of the incumbent.
        log_seed: Rollout seed of the simulated logs, one of seeds.train (-1: the first).
        evaluation_seeds: Held-out evaluation seeds ([]: the config's seeds.evaluation).
        logs_uri: Production logs to ingest instead of simulating (path or s3:// / gs:// URI); empty: simulate.
        algo: Algorithm to train: unexrl-cic, unexrl-ctde, td3, ddpg or independent-ddpg.
        train_nodes: 1: torchrun inside the train task; more: a multi-node TrainJob or PyTorchJob.
        train_workers: Training processes per node (one per GPU with device=cuda).
        train_job_kind: Multi-node launcher: trainjob (Kubeflow Trainer v2) or pytorchjob (training operator).
        train_image: Image of the multi-node job's pods.
        gpu_type: Accelerator resource of the train task and of a multi-node job's pods, e.g. nvidia.com/gpu.
        gpus_per_node: Accelerator count of the train task.
        gpu_node_selector: Node selector of the train task and of the job's pods.
        gpu_tolerations: Tolerations of the train task and of the job's pods.
        namespace: Namespace of the multi-node training job.
        data_pvc: PVC mounted at /data in train, deploy and resolve-incumbent (job data, model registry).
        min_uplift_pct: Gate: least uplift of watch time per session over the incumbent, percent.
        latency_budget_ms: Gate: largest p99 decision latency for one request through all stages, ms.
        bentoml_home: BentoML store the package step builds into (empty: BENTOML_HOME or the default).
        gitops_repo: Git repository (URL or path) with k8s/overlays/; the deploy step commits there.
        gitops_branch: Branch the deploy commit goes to (created when absent; Argo CD watches it).
        registry: Model registry directory (on the PVC): the deployed version per environment.
        serving_registry: Where materialize publishes the run's Feast registry for the serving pods (a path under
            /feast, where serving_registry_pvc is mounted); empty (the default): not published. On a cluster set it only
            with features.environment=redis, the online store serving reads, as each recurring run does.
        serving_registry_pvc: PVC mounted at /feast in materialize and, read-only, in the serving pods.
        feature_store_secret: Secret with the online store's connection-string (features.environment=redis).
        gitops_secret: Secret with the token (key token) the deploy step pushes to an HTTPS gitops_repo with.
    """
    incumbent = resolve_incumbent(registry=registry, environment=environment).set_caching_options(False)
    incumbent.set_display_name("resolve incumbent")

    sim = simulate_logs(
        config=config,
        config_overrides=config_overrides,
        log_seed=log_seed,
        logs_uri=logs_uri,
        incumbent=incumbent.outputs["incumbent"],
    )
    sim.set_display_name("simulate logs").set_retry(num_retries=2, backoff_duration="30s")
    signs_artifacts(sim)  # the CEM baseline (served as the shadow)
    logs = ingest_logs(
        config=config, config_overrides=config_overrides, logs_uri=logs_uri, simulated=sim.outputs["logs"]
    ).set_display_name("ingest + validate logs")
    logs.set_retry(num_retries=2, backoff_duration="30s")  # remote object stores are flaky
    # never cached: the logs at one logs_uri change from run to run (the key would only see the same string), and
    # a new logs artifact gives every task after it new inputs
    logs.set_caching_options(False)
    features = build_features(config=config, config_overrides=config_overrides, logs=logs.outputs["logs"])
    features.set_display_name("build features")
    store = materialize_features(
        config=config,
        config_overrides=config_overrides,
        features=features.outputs["features"],
        serving_registry=serving_registry,
    )
    store.set_display_name("materialize features (Feast)").set_retry(num_retries=2, backoff_duration="30s")
    reads_online_store(store, feature_store_secret)
    kubernetes.mount_pvc(store, pvc_name=serving_registry_pvc, mount_path=SERVING_REGISTRY_MOUNT)
    # the published registry: staging and prod serve only a registry their pipeline signed
    signs_artifacts(store)
    kubernetes.add_pod_label(store, *FEATURE_WRITER_LABEL)
    tset = build_training_set(
        config=config,
        config_overrides=config_overrides,
        logs=logs.outputs["logs"],
        features=features.outputs["features"],
        feature_store=store.outputs["feature_store"],
    ).set_display_name("point-in-time training set")
    reads_online_store(tset, feature_store_secret)

    trained = train(
        config=config,
        config_overrides=config_overrides,
        algo=algo,
        train_nodes=train_nodes,
        train_workers=train_workers,
        train_job_kind=train_job_kind,
        train_image=train_image,
        namespace=namespace,
        data_pvc=data_pvc,
        mount_path=DATA_MOUNT,
        gpu_type=gpu_type,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        logs=logs.outputs["logs"],
        training_set=tset.outputs["training_set"],
        cem=sim.outputs["cem"],
    )
    trained.set_display_name("train (TorchRec, torchrun / TrainJob)")
    trained.set_retry(
        num_retries=1, backoff_duration="60s"
    )  # a rare abort at exit; checkpoints make a retry cheap
    trained.set_accelerator_type(gpu_type).set_accelerator_limit(gpus_per_node)
    trained.set_cpu_request("4").set_memory_request("16G")
    kubernetes.add_node_selector_json(trained, gpu_node_selector)
    kubernetes.add_toleration_json(trained, gpu_tolerations)
    kubernetes.mount_pvc(trained, pvc_name=data_pvc, mount_path=DATA_MOUNT)
    signs_artifacts(trained)  # the candidate (a multi-node job's pods get the key from the runtime)

    release_steps(
        config=config,
        config_overrides=config_overrides,
        evaluation_seeds=evaluation_seeds,
        candidate=trained.outputs["model"],
        cem=sim.outputs["cem"],
        incumbent=incumbent.outputs["incumbent"],
        min_uplift_pct=min_uplift_pct,
        latency_budget_ms=latency_budget_ms,
        bentoml_home=bentoml_home,
        gitops_repo=gitops_repo,
        environment=environment,
        gitops_branch=gitops_branch,
        gitops_secret=gitops_secret,
        registry=registry,
        data_pvc=data_pvc,
    )
    kubernetes.mount_pvc(incumbent, pvc_name=data_pvc, mount_path=DATA_MOUNT)


def version_name(pipeline_yaml: Path) -> str:
    """The PipelineVersion's name: the package version and a digest of the compiled spec. KFP refuses to change
    a PipelineVersion's spec, so a changed pipeline must be a new version even when VERSION is not bumped (else
    Argo CD's sync of the platform overlay fails on every try)."""
    spec = json.dumps(list(yaml.safe_load_all(pipeline_yaml.read_text())), sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return f"unexrl-continuous-training-v{VERSION.replace('.', '-')}-{digest}"


def compile_all(pipeline_yaml: Path = PIPELINE_YAML, manifests_yaml: Path = MANIFESTS_YAML) -> None:
    """The IR YAML for upload, and the Pipeline/PipelineVersion resources for a GitOps-managed Kubeflow."""
    compiler.Compiler().compile(unexrl_continuous_training, str(pipeline_yaml))
    manifests_yaml.parent.mkdir(parents=True, exist_ok=True)
    options = KubernetesManifestOptions(
        pipeline_name="unexrl-continuous-training",
        pipeline_version_name=version_name(pipeline_yaml),
        namespace="kubeflow",
        include_pipeline_manifest=True,
    )
    compiler.Compiler().compile(
        unexrl_continuous_training,
        str(manifests_yaml),
        kubernetes_manifest_format=True,
        kubernetes_manifest_options=options,
    )
    shipped = (
        HERE.parent / "k8s" / "base" / "pipelines"
    )  # the platform overlays ship the same bytes (tests/test_k8s.py)
    if manifests_yaml == MANIFESTS_YAML and shipped.is_dir():
        shutil.copyfile(manifests_yaml, shipped / manifests_yaml.name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compile", action="store_true", help="write the YAML and the Kubernetes manifests")
    parser.add_argument("--pipeline-yaml", type=Path, default=PIPELINE_YAML, help="where the IR YAML goes")
    parser.add_argument(
        "--manifests-yaml", type=Path, default=MANIFESTS_YAML, help="where the Kubernetes manifests go"
    )
    args = parser.parse_args()
    if args.compile:
        compile_all(args.pipeline_yaml, args.manifests_yaml)
        copy = " (and its copy in k8s/base/pipelines/)" if args.manifests_yaml == MANIFESTS_YAML else ""
        print(f"wrote {args.pipeline_yaml} and {args.manifests_yaml}{copy}")


if __name__ == "__main__":
    main()
