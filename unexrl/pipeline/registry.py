"""A file-system model registry: which policy is deployed where, so the next run knows its incumbent.

    <root>/models/<model_version>/       a verified copy of each released policy artifact, whose manifest's
                                         digest is that version (checked on every write and read)
    <root>/environments/<environment>.json   {model_version, bento_tag, image_tag, commit, branch, repo, deployed_at}

The registry is a directory (locally under runs/, in a cluster on the pipeline's PVC), written atomically: a
reader sees the previous release or the new one, never half of one. The GitOps commit is the deployment; the
registry records it so the pipeline can resolve the incumbent without a cluster API.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from unexrl.contracts import files
from unexrl.contracts.artifact import ArtifactError, read_artifact
from unexrl.contracts.release import ENVIRONMENT, ReleaseRecord
from unexrl.io import atomic_directory


def _record_path(root: Path, environment: str) -> Path:
    """Where ``environment``'s release record lives; a name outside the release contract's grammar is refused here,
    before a run reads an incumbent or deploys under it."""
    if not re.fullmatch(ENVIRONMENT, environment):
        raise ValueError(f"environment {environment!r}: does not match {ENVIRONMENT}")
    return Path(root) / "environments" / f"{environment}.json"


def model_path(root: str | Path, record: ReleaseRecord) -> Path:
    """Where the registry keeps the artifact a record released."""
    return Path(root) / "models" / record.model_version


def deployed(root: str | Path, environment: str) -> ReleaseRecord | None:
    """The release record of ``environment``, or None when nothing was deployed there yet."""
    path = _record_path(Path(root), environment)
    return ReleaseRecord.read(path) if path.is_file() else None


def incumbent(root: str | Path, environment: str) -> Path | None:
    """The deployed policy artifact of ``environment`` (verified as the version its record names), or None on a
    first deployment."""
    record = deployed(root, environment)
    return _entry(Path(root), record) if record is not None else None


def _entry(root: Path, record: ReleaseRecord) -> Path:
    path = model_path(root, record)
    _check_version(path, record.model_version)  # an entry that changed is refused, not used as the incumbent
    return path


def register(root: str | Path, artifact: Path, record: ReleaseRecord) -> ReleaseRecord:
    """Store ``artifact`` as ``record.model_version`` (which must be its version) and make it
    ``record.environment``'s deployed model. The stored copy is verified as that version before it is published."""
    root = Path(root)
    _check_version(artifact, record.model_version)
    target = model_path(root, record)
    if target.is_dir():
        _check_version(target, record.model_version)
    else:
        with atomic_directory(target) as tmp:
            shutil.copytree(artifact, tmp, dirs_exist_ok=True)
            _check_version(tmp, record.model_version)
    record.write(_record_path(root, record.environment))
    return record


def resolve_incumbent(root: str, environment: str, out: Path) -> ReleaseRecord | None:
    """Copy ``environment``'s deployed policy into ``out`` (the run's incumbent artifact, verified as the copy it
    is) and return its record; on a first release (no registry or nothing deployed) leave ``out`` an empty
    directory and return None."""
    record = deployed(root, environment) if root else None
    with atomic_directory(Path(out), overwrite=True) as tmp:
        if record is not None:
            shutil.copytree(_entry(Path(root), record), tmp, dirs_exist_ok=True)
            _check_version(tmp, record.model_version)
    return record


def _check_version(path: Path, version: str) -> None:
    """``path`` verifies (read_artifact) as the artifact of ``version``; ArtifactError otherwise."""
    if (actual := read_artifact(path).version) != version:
        raise ArtifactError(f"{path}: artifact version {actual}, but the registry names it {version}")


def is_artifact(path: Path) -> bool:
    """Whether a resolved incumbent directory holds a policy (False: first release)."""
    return (Path(path) / files.MANIFEST).is_file()
