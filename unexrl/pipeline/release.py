"""After the gate: package the candidate as a Bento, deploy it by a GitOps commit, record it in the registry."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from unexrl.contracts import files
from unexrl.contracts.artifact import ArtifactError, read_artifact
from unexrl.contracts.evaluation import GateDecision
from unexrl.contracts.release import BentoRecord, ReleaseRecord
from unexrl.environ import environ
from unexrl.gitops import git
from unexrl.io import sha256_file
from unexrl.pipeline import registry as registries


def package(
    artifact: Path, out: Path, *, decision: Path, model_name: str = "unexrl-policy", bentoml_home: str = ""
) -> BentoRecord:
    """Import the verified policy into the BentoML model store and build the serving Bento (offline), only if
    ``decision`` (the gate's) passed exactly this artifact: the sha256 of its manifest is the one the evaluation
    recorded, so what ships is what the gate passed.

    ``bentoml_home``: the BentoML store to build into (empty: BENTOML_HOME or BentoML's default). Writes
    ``out``/bento.json and returns it. The serving image is tagged with the Bento's version (``bentoml
    containerize`` in CI, where Docker is).
    """
    from unexrl.serve.package import build_bento  # the serving engineer's packaging (unexrl/serve)

    verdict = GateDecision.read(decision)
    if not verdict.passed:
        raise ArtifactError(
            f"{decision}: the gate refused this candidate ({'; '.join(verdict.reasons)}); not packaging"
        )
    digest = read_artifact(Path(artifact)).sha256
    if digest != verdict.candidate_sha256:
        raise ArtifactError(
            f"{artifact}: manifest sha256 {digest[:12]}... is not the candidate the gate passed "
            f"({verdict.candidate_sha256[:12]}...); not packaging"
        )
    home = str(Path(bentoml_home).resolve()) if bentoml_home else os.environ.get("BENTOML_HOME", "")
    # read when bentoml is first imported: a component process imports it here, first
    with environ({"BENTOML_HOME": home} if home else {}):
        # the import checks the artifact again as it copies it: what ships is the candidate the gate passed
        info = build_bento(Path(artifact), model_name=model_name, expected_sha256=verdict.candidate_sha256)
        import bentoml

        archive = Path(out) / files.BENTO_ARCHIVE
        archive.parent.mkdir(parents=True, exist_ok=True)
        # whole or not at all: exported beside it (the same .bento suffix, so BentoML adds none), then renamed
        partial = archive.with_name(f".{os.getpid()}.{archive.name}")
        try:
            Path(bentoml.export_bento(info.bento_tag, str(partial))).replace(archive)
        finally:
            partial.unlink(missing_ok=True)
    record = BentoRecord(
        bento_tag=info.bento_tag,
        model_tag=info.model_tag,
        model_version=info.model_version,
        image_tag=info.bento_tag.split(":", 1)[1],
        bentoml_home=home,
        archive_sha256=sha256_file(archive),
    )
    record.write(Path(out) / files.BENTO)
    return record


def deploy(
    bento_dir: Path, artifact: Path, *, gitops_repo: str, environment: str, gitops_branch: str, registry: str
) -> ReleaseRecord:
    """Commit the bento ``package`` wrote into ``bento_dir`` to the environment's overlay on ``gitops_branch`` of
    ``gitops_repo`` (GitOps), then make it the deployed model in the ``registry`` directory (when given); returns
    the release record."""
    from unexrl.gitops import deploy as git_deploy

    bento = BentoRecord.read(Path(bento_dir) / files.BENTO)
    commit = git_deploy(
        gitops_repo,
        environment=environment,
        model_version=bento.model_version,
        image_tag=bento.image_tag,
        branch=gitops_branch,
    )
    record = ReleaseRecord(
        environment=environment,
        model_version=bento.model_version,
        bento_tag=bento.bento_tag,
        image_tag=bento.image_tag,
        commit=commit,
        branch=gitops_branch,
        repo=gitops_repo,
    )
    return registries.register(registry, artifact, record) if registry else record


def init_manifests_repo(path: Path, k8s_tree: Path) -> Path:
    """A bare git repository at ``path`` holding ``k8s_tree`` as k8s/ on main (once; an existing one is kept).

    `make run` deploys into it as a cluster's GitOps repository would be deployed into.
    """
    path = Path(path)
    if (path / "HEAD").is_file():
        return path
    if not (Path(k8s_tree) / "overlays").is_dir():
        raise FileNotFoundError(
            f"no Kustomize overlays under {k8s_tree}: the manifests repository is seeded from the "
            "project's k8s/ tree (k8s/overlays/<environment>/kustomization.yaml)"
        )
    with tempfile.TemporaryDirectory(prefix="unexrl-manifests-") as tmp:
        work = Path(tmp)
        shutil.copytree(k8s_tree, work / "k8s")
        git(work, "init", "--quiet", "-b", "main")
        git(work, "add", "--", "k8s")
        git(work, "commit", "--quiet", "-m", "seed manifests")
        git(None, "clone", "--quiet", "--bare", "--", str(work), str(path))
    return path
