"""A file-system model registry: which policy is deployed where, so the next run knows its incumbent.

    <root>/models/<model_version>/       a verified copy of each released policy artifact
    <root>/environments/<environment>.json   {model_version, bento_tag, image_tag, commit, branch, repo, deployed_at}

The registry is a directory (locally under runs/, in a cluster on the pipeline's PVC), written atomically: a
reader sees the previous release or the new one, never half of one. The GitOps commit is the deployment; the
registry records it so the pipeline can resolve the incumbent without a cluster API.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from unexrl.io import atomic_directory, atomic_write_text
from unexrl.policies.artifact import read_manifest


def _record_path(root: Path, environment: str) -> Path:
    return Path(root) / "environments" / f"{environment}.json"


def deployed(root: str | Path, environment: str) -> dict[str, Any] | None:
    """The release record of ``environment``, or None when nothing was deployed there yet."""
    path = _record_path(Path(root), environment)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    record["artifact"] = str(Path(root) / "models" / record["model_version"])
    return record


def incumbent(root: str | Path, environment: str) -> Path | None:
    """The deployed policy artifact of ``environment`` (verified), or None on a first deployment."""
    record = deployed(root, environment)
    if record is None:
        return None
    path = Path(record["artifact"])
    read_manifest(path)  # a registry entry whose files changed is refused, not served as the incumbent
    return path


def register(
    root: str | Path, environment: str, artifact: Path, *, model_version: str, release: dict[str, Any]
) -> dict[str, Any]:
    """Store ``artifact`` as ``model_version`` and make it ``environment``'s deployed model; returns the record."""
    root = Path(root)
    read_manifest(artifact)
    target = root / "models" / model_version
    if not target.is_dir():
        with atomic_directory(target) as tmp:
            shutil.copytree(artifact, tmp, dirs_exist_ok=True)
    record = {
        "environment": environment,
        "model_version": model_version,
        "deployed_at": datetime.now(UTC).isoformat(),
        **release,
    }
    path = _record_path(root, environment)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def resolve_incumbent(root: str, environment: str, out: Path) -> dict[str, Any] | None:
    """Copy ``environment``'s deployed policy into ``out`` (the run's incumbent artifact) and return its record;
    on a first release (no registry or nothing deployed) leave ``out`` an empty directory and return None."""
    out = Path(out)
    path = incumbent(root, environment) if root else None
    with atomic_directory(out, overwrite=True) as tmp:
        if path is not None:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
    return deployed(root, environment) if path is not None else None


def is_artifact(path: Path) -> bool:
    """Whether a resolved incumbent directory holds a policy (False: first release)."""
    return (Path(path) / "manifest.json").is_file()
