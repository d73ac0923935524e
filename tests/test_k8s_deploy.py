"""The pipeline's deploy step (unexrl.gitops.deploy) against a temporary git repository holding k8s/: the edited
overlay, rendered by `kubectl kustomize`, carries the new model version and image tag, and nothing else changed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed"),
    pytest.mark.skipif(shutil.which("git") is None, reason="git not installed"),
]


def git(cwd, *args) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": "/usr/bin:/bin",
        "HOME": str(cwd),
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def manifests_repo(tmp_path) -> Path:
    """A bare repository (the 'remote') whose main branch holds this checkout's k8s/ and feature_repo/."""
    work = tmp_path / "seed"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    shutil.copytree(ROOT / "k8s", work / "k8s")
    git(work, "add", "k8s")
    git(work, "commit", "-q", "-m", "manifests")
    bare = tmp_path / "manifests.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    return bare


def render(path: Path) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("environment", ["dev", "prod"])
def test_deploy_commit_renders_new_version_and_tag(manifests_repo, tmp_path, environment):
    gitops = pytest.importorskip("unexrl.gitops", reason="unexrl.gitops (pipeline issue) not merged yet")
    sha = gitops.deploy(
        str(manifests_repo),
        environment=environment,
        model_version="20260101-cic-7",
        image_tag="unexrl-serving-abc123",
        branch=f"deploy/{environment}-20260101",
    )
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", "-b", f"deploy/{environment}-20260101", str(manifests_repo), str(checkout))
    assert git(checkout, "rev-parse", "HEAD").strip() == sha
    # exactly one file changed, and in it only the two release fields
    changed = git(checkout, "diff", "--name-only", "origin/main", "HEAD").split()
    assert changed == [f"k8s/overlays/{environment}/kustomization.yaml"]
    diff = [
        line
        for line in git(checkout, "diff", "-U0", "origin/main", "HEAD").splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(diff) == 4, diff
    docs = render(checkout / f"k8s/overlays/{environment}")
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "unexrl-serving")
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith("/unexrl-serving:unexrl-serving-abc123"), image
    assert dep["spec"]["template"]["metadata"]["annotations"]["unexrl.io/model-version"] == "20260101-cic-7"
    rollout = next(d for d in docs if d["kind"] == "Rollout")
    # the canary analysis reads the version from the Rollout's annotation
    assert rollout["metadata"]["annotations"]["unexrl.io/model-version"] == "20260101-cic-7"
    # the other overlays are untouched
    for other in {"dev", "staging", "prod"} - {environment}:
        assert (checkout / f"k8s/overlays/{other}/kustomization.yaml").read_text() == (
            ROOT / f"k8s/overlays/{other}/kustomization.yaml"
        ).read_text()
