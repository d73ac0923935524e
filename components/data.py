"""Steps 1-3: logs (simulated or ingested), features (build + Feast materialisation), the point-in-time training set."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def simulate_logs(
    config: str,
    overrides: list,
    log_seed: int,
    logs_uri: str,
    incumbent: Input[Model],
    logs: Output[Dataset],
    cem: Output[Model],
):
    """The embedded stand-in for production logs: the deployed policy (CEM on a first release) with exploration.

    Always tunes and outputs CEM (the baseline for training and evaluation); writes no logs when ``logs_uri`` is
    given (ingest_logs takes those).
    """
    from pathlib import Path

    from unexrl.pipeline import registry, steps

    cfg = steps.resolve_config(config, overrides)
    deployed = Path(incumbent.path) if registry.is_artifact(Path(incumbent.path)) else None
    if logs_uri:
        steps.tune_cem_artifact(cfg, Path(cem.path))
        Path(logs.path).mkdir(parents=True, exist_ok=True)
        logs.metadata["skipped"] = f"external logs: {logs_uri}"
        return
    manifest = steps.simulate_logs(cfg, Path(logs.path), Path(cem.path), deployed, log_seed)
    logs.metadata.update(
        {
            "behaviour": manifest["behaviour"]["kind"],
            "seeds": manifest["seeds"],
            "rows": {k: v["rows"] for k, v in manifest["files"].items()},
        }
    )


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest_logs(
    config: str, overrides: list, logs_uri: str, simulated: Input[Dataset], logs: Output[Dataset]
):
    """Validate the logs with the log contract (unexrl.data.read_logs) and publish them: from ``logs_uri`` when
    given (logs from outside), else the simulated ones. An invalid log fails the run naming file, column, rows."""
    from pathlib import Path

    from unexrl.pipeline import steps

    cfg = steps.resolve_config(config, overrides)
    manifest = steps.ingest_logs(logs_uri or simulated.path, Path(logs.path), cfg)
    logs.metadata.update(
        {"source": logs_uri or "simulated", "rows": {k: v["rows"] for k, v in manifest["files"].items()}}
    )


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def build_features(config: str, overrides: list, logs: Input[Dataset], features: Output[Dataset]):
    """Feature tables from the logs, each row stamped when its information was known (docs/features.md)."""
    from pathlib import Path

    from unexrl.pipeline import steps

    manifest = steps.build_features(
        steps.resolve_config(config, overrides), Path(logs.path), Path(features.path)
    )
    features.metadata["rows"] = {k: v["rows"] for k, v in manifest["tables"].items()}


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def materialize_features(
    config: str, overrides: list, features: Input[Dataset], feature_store: Output[Artifact]
):
    """Feast apply + materialise the feature tables into this run's store (features.environment decides which)."""
    from pathlib import Path

    from unexrl.pipeline import steps

    result = steps.materialize_features(
        steps.resolve_config(config, overrides), Path(features.path), Path(feature_store.path)
    )
    feature_store.metadata.update({"start": result["start"], "end": result["end"]})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def build_training_set(
    config: str,
    overrides: list,
    logs: Input[Dataset],
    feature_store: Input[Artifact],
    training_set: Output[Dataset],
):
    """Point-in-time join of every logged request with the training feature service (one Parquet file)."""
    from pathlib import Path

    from unexrl.pipeline import steps

    result = steps.build_training_set(
        steps.resolve_config(config, overrides),
        Path(logs.path),
        Path(feature_store.path),
        Path(training_set.path),
    )
    training_set.metadata.update({"rows": result["rows"], "columns": result["columns"]})
