"""Package a policy artifact for serving: the BentoML model store entry and the bento (offline, no Docker).

The pipeline's ``package`` step calls :func:`build_bento`. The artifact is verified (every file's sha256)
and loaded against its own config before anything is written, so a tampered or broken artifact never reaches
the model store; the service verifies it again when it starts.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from unexrl.contracts.artifact import ArtifactError, read_artifact
from unexrl.environ import environ
from unexrl.serve.engine import load_serving_policy, serving_config
from unexrl.serve.requirements import serving_requirements
from unexrl.sim.world import build_world

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENTOFILE = PROJECT_ROOT / "serving" / "bentofile.yaml"
NO_DEPS_SCRIPT = "serving/install-no-deps.sh"
"""run after the Bento's requirements (relative to the build context)"""
SERVICE_MODULE = "serving.service"
"""the module bentofile.yaml names (service: "serving.service:Recommendation")"""
ARTIFACT_SUBDIR = "artifact"
"""where the artifact's files sit inside a BentoML model directory"""
ENV_MODEL = "UNEXRL_MODEL"
ENV_SHADOW_MODEL = "UNEXRL_SHADOW_MODEL"
DEFAULT_MODEL = "unexrl-policy:latest"


@dataclass(frozen=True)
class BentoInfo:
    bento_tag: str
    model_tag: str
    model_version: str


def import_model(
    artifact_dir: Path, *, model_name: str = "unexrl-policy", expected_sha256: str | None = None
) -> tuple[str, str]:
    """Verify ``artifact_dir`` and copy it into the BentoML model store as ``model_name:<artifact version>``;
    importing the same artifact again reuses the entry. Returns (model tag, version).

    ``expected_sha256``: the artifact it must be (the gate's decision names the candidate so). The entry as saved
    is verified as that same artifact, and removed if it is not (a file changed while it was copied)."""
    import bentoml

    artifact_dir = Path(artifact_dir)
    manifest = read_artifact(artifact_dir)  # verified before its config builds a world
    if expected_sha256 is not None and manifest.sha256 != expected_sha256:
        raise ArtifactError(
            f"{artifact_dir}: manifest sha256 {manifest.sha256[:12]}... is not the expected "
            f"{expected_sha256[:12]}...; not importing"
        )
    cfg = serving_config(manifest, {})
    # refuses a kind this version cannot serve; the same artifact as the manifest verified above, or refused
    version = load_serving_policy(artifact_dir, cfg, build_world(cfg), manifest.version).version
    tag = f"{model_name}:{version}"
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        stored = None
    if stored is not None:  # the same version: reused only while it is still exactly that artifact
        try:
            _verify_copy(Path(stored.path) / ARTIFACT_SUBDIR, manifest.sha256)
        except ArtifactError as err:
            raise ArtifactError(
                f"the model store's {tag} does not verify as the artifact imported under that version ({err}); "
                f"remove it (`bentoml models delete {tag}`) to import {artifact_dir} again"
            ) from None
        return tag, version
    labels = {"kind": manifest.kind, "algorithm": manifest.algorithm}
    with bentoml.models.create(tag, labels=labels, metadata={"files": manifest.files}) as model:
        # links copied as links, so that the check below refuses them
        shutil.copytree(artifact_dir, Path(model.path) / ARTIFACT_SUBDIR, symlinks=True)
    try:  # the entry as saved in the store is the artifact verified above, or it is removed
        _verify_copy(Path(bentoml.models.get(tag).path) / ARTIFACT_SUBDIR, manifest.sha256)
    except ArtifactError:
        bentoml.models.delete(tag)
        raise
    return tag, version


def _verify_copy(path: Path, sha256: str) -> None:
    """``path`` verifies as an artifact whose manifest has digest ``sha256``."""
    if (digest := read_artifact(path).sha256) != sha256:
        raise ArtifactError(f"{path}: its manifest's digest is {digest[:16]}, not {sha256[:16]}")


def build_bento(
    artifact_dir: Path, *, model_name: str = "unexrl-policy", expected_sha256: str | None = None
) -> BentoInfo:
    """Import the artifact (:func:`import_model`, which refuses any other than ``expected_sha256``) and build the
    service's bento around exactly that model version, from serving/bentofile.yaml. Respects BENTOML_HOME (both
    stores live there)."""
    import bentoml

    model_tag, version = import_model(artifact_dir, model_name=model_name, expected_sha256=expected_sha256)
    sys.modules.pop(
        SERVICE_MODULE, None
    )  # BentoML reuses an imported module: an earlier build's model otherwise
    spec = yaml.safe_load(BENTOFILE.read_text())
    # every distribution pinned to what this environment runs; the no-deps packages (TorchRec) follow in the
    # setup script, which reads them from the Bento's own pyproject.toml
    packages = serving_requirements(PROJECT_ROOT / "pyproject.toml")
    spec["python"] = {"packages": packages, "lock_packages": False}
    spec["docker"] = {"setup_script": NO_DEPS_SCRIPT}
    with environ({ENV_MODEL: model_tag}):  # the service class names its model at import: pin this version
        bento = bentoml.bentos.build(**spec, build_ctx=str(PROJECT_ROOT), version=version)
    return BentoInfo(bento_tag=str(bento.tag), model_tag=model_tag, model_version=version)
