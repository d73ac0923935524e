"""unexrl.gitops.deploy against real git repositories: one commit on the branch, exactly two fields changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from unexrl.gitops import ANNOTATION, GitOpsError, deploy
from unexrl.pipeline.release import init_manifests_repo

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = """# staging overlay (comment kept by the deploy)
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base
images:
  - name: other-image
    newTag: "7"
  - name: unexrl-serving
    newName: registry.example.com/unexrl-serving
    newTag: "0.0.0"
commonAnnotations:
  team: recsys
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_repo(tmp_path: Path, overlay: str | None = OVERLAY, environment: str = "staging") -> Path:
    tree = tmp_path / "k8s"
    (tree / "overlays" / environment).mkdir(parents=True)
    if overlay is not None:
        (tree / "overlays" / environment / "kustomization.yaml").write_text(overlay)
    return init_manifests_repo(tmp_path / "manifests.git", tree)


def test_deploy_commits_two_fields_on_a_new_branch(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    sha = deploy(
        str(repo),
        environment="staging",
        model_version="unexrl-policy:abc123",
        image_tag="v42",
        branch="release/staging",
    )
    assert git(repo, "rev-parse", "release/staging").strip() == sha
    assert git(repo, "rev-parse", "main").strip() != sha  # main untouched
    changed = git(repo, "diff", "--name-only", "main", "release/staging").split()
    assert changed == ["k8s/overlays/staging/kustomization.yaml"]
    text = git(repo, "show", "release/staging:k8s/overlays/staging/kustomization.yaml")
    doc = yaml.safe_load(text)
    images = {e["name"]: e for e in doc["images"]}
    assert images["unexrl-serving"]["newTag"] == "v42"
    assert images["unexrl-serving"]["newName"] == "registry.example.com/unexrl-serving"
    assert images["other-image"]["newTag"] == "7"
    assert doc["commonAnnotations"] == {"team": "recsys", ANNOTATION: "unexrl-policy:abc123"}
    assert text.startswith("# staging overlay (comment kept by the deploy)")
    diff = [
        line
        for line in git(repo, "diff", "main", "release/staging").splitlines()
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]
    assert (
        len([d for d in diff if d.startswith("-")]) == 1 and len([d for d in diff if d.startswith("+")]) == 2
    )

    # a second release stacks on the branch
    sha2 = deploy(
        str(repo),
        environment="staging",
        model_version="unexrl-policy:def456",
        image_tag="v43",
        branch="release/staging",
    )
    assert git(repo, "rev-parse", "release/staging~1").strip() == sha
    assert (
        yaml.safe_load(git(repo, "show", f"{sha2}:k8s/overlays/staging/kustomization.yaml"))["images"][1][
            "newTag"
        ]
        == "v43"
    )


def test_deploy_refuses_missing_overlay_or_image(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "a")
    with pytest.raises(GitOpsError, match="no overlay"):
        deploy(str(repo), environment="prod", model_version="m", image_tag="t", branch="main")
    repo = make_repo(tmp_path / "b", OVERLAY.replace("unexrl-serving", "someone-else"))
    with pytest.raises(GitOpsError, match="name: unexrl-serving"):
        deploy(str(repo), environment="staging", model_version="m", image_tag="t", branch="main")
    with pytest.raises(GitOpsError, match="gitops_repo"):
        deploy("", environment="staging", model_version="m", image_tag="t", branch="main")
    with pytest.raises(GitOpsError, match="image_tag"):
        deploy(str(repo), environment="staging", model_version="m", image_tag="has space", branch="main")
    with pytest.raises(GitOpsError, match="not starting with '-'"):  # never an option to git
        deploy(str(repo), environment="staging", model_version="m", image_tag="t", branch="-f")
    # a name git would take but the release record would not: refused before the push, not after it
    with pytest.raises(GitOpsError, match="environment 'Prod_eu': does not match"):
        deploy(str(repo), environment="Prod_eu", model_version="m", image_tag="t", branch="main")
    assert len(git(repo, "log", "--oneline", "main").splitlines()) == 1  # nothing was pushed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_tag", "-latest"),  # a tag cannot start with '-' or '.'
        ("image_tag", "v1;rm"),
        ("image_tag", "x" * 129),  # at most 128 characters
        ("model_version", "Unexrl-Policy:abc"),  # BentoML names are lowercase
        ("model_version", "unexrl-policy:abc:def"),
        ("model_version", "../policy"),
    ],
)
def test_deploy_checks_image_tag_and_model_version_grammar(tmp_path: Path, field: str, value: str) -> None:
    repo = make_repo(tmp_path)
    fields = {"model_version": "unexrl-policy:abc123", "image_tag": "v42"} | {field: value}
    with pytest.raises(GitOpsError, match=f"{field} .*does not match"):
        deploy(str(repo), environment="staging", branch="main", **fields)
    assert len(git(repo, "log", "--oneline", "main").splitlines()) == 1


def test_a_repository_argument_is_never_a_git_option(tmp_path: Path) -> None:
    """``--upload-pack=<command>`` as the repository would run the command on a clone from a real repository; after
    ``--`` git reads it as a repository path that does not exist."""
    pwned = tmp_path / "pwned"
    repo = f"--upload-pack=touch {pwned}"
    with pytest.raises(GitOpsError, match="repository '--upload-pack=touch .*' does not exist"):
        deploy(repo, environment="staging", model_version="m", image_tag="t", branch="main")
    assert not pwned.exists()


def test_project_overlays_take_a_deployment(tmp_path: Path) -> None:
    """The k8s/ tree of this repository honours the two fields for every environment."""
    repo = init_manifests_repo(tmp_path / "m.git", ROOT / "k8s")
    for env in sorted(
        p.name for p in (ROOT / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file()
    ):
        sha = deploy(
            str(repo), environment=env, model_version="unexrl-policy:x1", image_tag="x1", branch="main"
        )
        doc = yaml.safe_load(git(repo, "show", f"{sha}:k8s/overlays/{env}/kustomization.yaml"))
        assert [e["newTag"] for e in doc["images"] if e["name"] == "unexrl-serving"] == ["x1"]
        assert doc["commonAnnotations"][ANNOTATION] == "unexrl-policy:x1"
