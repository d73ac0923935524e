"""Files the package ships beside its code, found with importlib.resources: the configs, the Feast repository
template, the monitoring rules and dashboard, and the training runtime. In a source checkout ``unexrl/bundled/``
links to the project's own ``configs/``, ``feature_repo/``, ``k8s/monitoring/`` and ``k8s/base/training/``; a built
wheel holds copies, so an installed package needs no checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

BUNDLED = Path(str(files("unexrl") / "bundled"))
CONFIG_NAMES = ("small", "default", "paper")
FEATURE_REPO = "feature_repo"
"""the default ``features.repo``: ./feature_repo when there is one, else the bundled template"""


def config_file(config: str | Path) -> Path:
    """A YAML path as given, or a config name (``small``, ``default``, ``paper``) as the bundled file."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml"):
        return path
    if str(config) not in CONFIG_NAMES:
        raise FileNotFoundError(
            f"config {config!r}: not a YAML path, nor one of the bundled {list(CONFIG_NAMES)}"
        )
    return BUNDLED / "configs" / f"{config}.yaml"


def feature_repo_template() -> Path:
    """The Feast repository the package ships (definitions, feature_store.yaml, environments/): read it, or copy
    it (``unexrl features init``); never write into it."""
    return BUNDLED / "feature_repo"


def monitoring_file(name: str) -> Path:
    """``prometheusrule.yaml`` or ``dashboard.json``: what the serving metrics are recorded and shown with."""
    return BUNDLED / "monitoring" / name


def training_runtime_file() -> Path:
    """k8s/base/training/trainingruntime.yaml: the hardened pod every training job runs (the TrainJob names it;
    a PyTorchJob is rendered from its pod template, unexrl/pipeline/launcher.py)."""
    return BUNDLED / "training" / "trainingruntime.yaml"
