"""Steps 1-3: logs (simulated or ingested), features (build + Feast materialisation), the point-in-time training set."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def simulate_logs(
    config: str,
    config_overrides: list,
    log_seed: int,
    logs_uri: str,
    incumbent: Input[Model],
    logs: Output[Dataset],
    cem: Output[Model],
):
    """The embedded stand-in for production logs: the deployed policy (CEM on a first release) with exploration.

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path.
        config_overrides: --set items applied to the configuration.
        log_seed: Rollout seed of the sessions, one of seeds.train (-1: the first).
        logs_uri: Logs from outside (ingest_logs takes them): when set, no sessions are simulated.
        incumbent: The deployed policy to log under (empty on a first release: CEM).
        logs: The simulated log directory (users, items, transitions, manifest).
        cem: CEM tuned on seeds.train: the baseline for training and evaluation.
    """
    from pathlib import Path

    from unexrl.pipeline import steps

    manifest = steps.simulate_logs(
        steps.resolve_config(config, config_overrides),
        logs_out=Path(logs.path),
        cem_out=Path(cem.path),
        incumbent=Path(incumbent.path),
        log_seed=log_seed,
        logs_uri=logs_uri,
    )
    if manifest is None:
        logs.metadata["skipped"] = f"external logs: {logs_uri}"
    else:
        logs.metadata.update(
            {
                "behaviour": manifest.behaviour["kind"],
                "seeds": manifest.seeds,
                "rows": {name: entry.rows for name, entry in manifest.files.items()},
            }
        )


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest_logs(
    config: str, config_overrides: list, logs_uri: str, simulated: Input[Dataset], logs: Output[Dataset]
):
    """Validate the logs with the log contract (unexrl.data.read_logs) and publish them. An invalid log fails the
    run naming file, column and rows.

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path.
        config_overrides: --set items applied to the configuration.
        logs_uri: Logs from outside (a path or an s3:// / gs:// URI); empty: the simulated ones.
        simulated: The simulated logs (used when logs_uri is empty).
        logs: The validated log directory every later step reads.
    """
    from pathlib import Path

    from unexrl.pipeline import steps

    manifest = steps.ingest_logs(
        steps.resolve_config(config, config_overrides),
        logs_uri=logs_uri,
        simulated=Path(simulated.path),
        out=Path(logs.path),
    )
    logs.metadata.update(
        {
            "source": logs_uri or "simulated",
            "rows": {name: entry.rows for name, entry in manifest.files.items()},
        }
    )


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def build_features(config: str, config_overrides: list, logs: Input[Dataset], features: Output[Dataset]):
    """Feature tables from the logs, each row stamped when its information was known (docs/features.md).

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path.
        config_overrides: --set items applied to the configuration.
        logs: The validated log directory.
        features: One Parquet table per feature view and their manifest.
    """
    from pathlib import Path

    from unexrl.pipeline import steps

    manifest = steps.build_features(
        steps.resolve_config(config, config_overrides), Path(logs.path), Path(features.path)
    )
    features.metadata["rows"] = {name: table.rows for name, table in manifest.tables.items()}


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def materialize_features(
    config: str,
    config_overrides: list,
    features: Input[Dataset],
    feature_store: Output[Artifact],
    serving_registry: str = "",
):
    """Feast apply + materialise the feature tables into this run's store (features.environment decides which).

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path.
        config_overrides: --set items applied to the configuration.
        features: The feature tables of build_features.
        feature_store: This run's Feast repository (definitions, registry, online store).
        serving_registry: Where to publish this run's registry for the serving replicas (a file path, e.g. on the
            PVC they mount); empty: not published.
    """
    from pathlib import Path

    from unexrl.pipeline import steps

    result = steps.materialize_features(
        steps.resolve_config(config, config_overrides),
        Path(features.path),
        Path(feature_store.path),
        Path(serving_registry) if serving_registry else None,
    )
    feature_store.metadata.update({"start": result["start"], "end": result["end"]})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def build_training_set(
    config: str,
    config_overrides: list,
    logs: Input[Dataset],
    features: Input[Dataset],
    feature_store: Input[Artifact],
    training_set: Output[Dataset],
):
    """Point-in-time join of every logged request with the training feature service (one Parquet file).

    Args:
        config: Configuration: a name in configs/ (small, default, paper) or a YAML path.
        config_overrides: --set items applied to the configuration.
        logs: The validated log directory (one entity row per logged request).
        features: The feature tables the store was materialised from: its registry reads them, so they are
            downloaded here too.
        feature_store: The Feast repository materialize_features built.
        training_set: The joined training set (Parquet).
    """
    from pathlib import Path

    from unexrl.pipeline import steps

    result = steps.build_training_set(
        steps.resolve_config(config, config_overrides),
        Path(logs.path),
        Path(features.path),
        Path(feature_store.path),
        Path(training_set.path),
    )
    training_set.metadata.update({"rows": result["rows"], "columns": result["columns"]})
