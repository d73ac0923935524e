"""Step 4: distributed TorchRec training (torchrun here, or a multi-node TrainJob / PyTorchJob in a cluster)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAIN_GPU_IMAGE


@dsl.component(base_image=TRAIN_GPU_IMAGE, install_kfp_package=False)
def train(
    config: str,
    overrides: list,
    algo: str,
    nodes: int,
    processes_per_node: int,
    job_kind: str,
    image: str,
    namespace: str,
    pvc: str,
    mount_path: str,
    node_selector: dict,
    tolerations: list,
    logs: Input[Dataset],
    training_set: Input[Dataset],
    cem: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train ``algo`` offline from the logs (the training set checked against them and hashed into the export).

    ``nodes`` == 1: torchrun with ``processes_per_node`` workers in this pod (CPU processes over gloo locally,
    one per GPU with ``device=cuda`` in a GPU pod). ``nodes`` > 1: submit a ``job_kind`` (trainjob | pytorchjob)
    of ``nodes`` x ``processes_per_node`` GPUs running ``image`` in ``namespace`` over the shared PVC ``pvc`` mounted at
    ``mount_path``, with the same node selector and tolerations as this task, and wait for it.
    """
    import uuid
    from pathlib import Path

    from unexrl.pipeline import steps

    job = (
        {
            "kind": job_kind,
            "name": f"unexrl-train-{uuid.uuid4().hex[:8]}",
            "namespace": namespace,
            "image": image,
            "pvc": pvc,
            "mount_path": mount_path,
            "node_selector": dict(node_selector),
            "tolerations": list(tolerations),
        }
        if nodes > 1
        else None
    )
    summary = steps.train(
        steps.resolve_config(config, overrides),
        logs=Path(logs.path),
        training_set=Path(training_set.path),
        cem=Path(cem.path),
        out=Path(model.path),
        algo=algo,
        nodes=nodes,
        processes_per_node=processes_per_node,
        job=job,
    )
    model.metadata.update(
        {
            "algorithm": summary["algorithm"],
            "updates": summary["updates"],
            "world_size": summary["world_size"],
        }
    )
    metrics.log_metric("updates", summary["updates"])
    metrics.log_metric("updates_per_s", summary["updates_per_s"] or 0.0)
    metrics.log_metric("final_validation_watch_time", summary["final_validation_watch_time"] or 0.0)
