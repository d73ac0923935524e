"""Step 4: distributed TorchRec training (torchrun here, or a multi-node TrainJob / PyTorchJob in a cluster)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAIN_GPU_IMAGE


@dsl.component(base_image=TRAIN_GPU_IMAGE, install_kfp_package=False)
def train(
    config: str,
    config_overrides: list,
    algo: str,
    train_nodes: int,
    train_workers: int,
    train_job_kind: str,
    train_image: str,
    namespace: str,
    data_pvc: str,
    mount_path: str,
    gpu_type: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    logs: Input[Dataset],
    training_set: Input[Dataset],
    cem: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train ``algo`` offline from the logs (the training set checked against them and hashed into the export).

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path.
        config_overrides: --set items applied to the configuration, e.g. ["device=cuda"].
        algo: Algorithm: unexrl-cic, unexrl-ctde, td3, ddpg or independent-ddpg.
        train_nodes: 1: torchrun inside this task; more: a multi-node job of train_job_kind.
        train_workers: Training processes per node (one per GPU with device=cuda).
        train_job_kind: Multi-node launcher: trainjob (Kubeflow Trainer v2) or pytorchjob (training operator).
        train_image: Image of the multi-node job's pods.
        namespace: Namespace of the multi-node job.
        data_pvc: PVC shared with the job's pods (inputs staged in, the run written back).
        mount_path: Where data_pvc is mounted in this task and in the job's pods.
        gpu_type: Accelerator resource each of the job's pods requests train_workers of (the same as this task's).
        gpu_node_selector: Node selector of the job's pods (the same as this task's).
        gpu_tolerations: Tolerations of the job's pods (the same as this task's).
        logs: The validated logs to train from.
        training_set: The point-in-time training set, verified against the logs and hashed into the export.
        cem: CEM weights for the stages that do not learn.
        model: The exported actors (an actors artifact, verified before it is published).
        metrics: Updates, updates/s and the final validation watch time.
    """
    from pathlib import Path

    from unexrl.pipeline import steps

    summary = steps.train(
        steps.resolve_config(config, config_overrides),
        logs=Path(logs.path),
        training_set=Path(training_set.path),
        cem=Path(cem.path),
        out=Path(model.path),
        algo=algo,
        train_nodes=train_nodes,
        train_workers=train_workers,
        train_job_kind=train_job_kind,
        train_image=train_image,
        namespace=namespace,
        data_pvc=data_pvc,
        mount_path=mount_path,
        gpu_type=gpu_type,
        gpu_node_selector=dict(gpu_node_selector),
        gpu_tolerations=list(gpu_tolerations),
    )
    model.metadata.update(summary.model_dump(include={"algorithm", "updates", "world_size"}))
    metrics.log_metric("updates", summary.updates)
    metrics.log_metric("updates_per_s", summary.updates_per_s or 0.0)
    metrics.log_metric("final_validation_watch_time", summary.final_validation_watch_time or 0.0)
