"""GitOps deployment: a release is a commit to a Kustomize overlay, never a call to a cluster API.

``deploy`` clones the manifests repository, sets two fields of ``k8s/overlays/<environment>/kustomization.yaml``
(the ``unexrl-serving`` image's ``newTag`` and the ``unexrl.io/model-version`` annotation) on a branch, commits and
pushes the branch back. Argo CD (k8s/) syncs the cluster from that branch. Comments and layout of the overlay are
kept (ruamel round trip), so a reviewer's diff shows exactly the two changed lines.

An HTTPS remote that needs credentials gets a token from ``UNEXRL_GIT_TOKEN`` (the pipeline's deploy task reads
it from a Secret): git sends it as HTTP basic authentication in a header it is given through its environment, for
that remote's host only, never in the URL, the command line or a file; a token with a remote that is not HTTPS
is refused.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ruamel.yaml import YAML

from unexrl.contracts.release import ENVIRONMENT
from unexrl.io import atomic_write_text

IMAGE_NAME = "unexrl-serving"
ANNOTATION = "unexrl.io/model-version"
_AUTHOR = {
    "GIT_AUTHOR_NAME": "unexrl-pipeline",
    "GIT_AUTHOR_EMAIL": "pipeline@unexrl.invalid",
    "GIT_COMMITTER_NAME": "unexrl-pipeline",
    "GIT_COMMITTER_EMAIL": "pipeline@unexrl.invalid",
}
_REF = re.compile(r"^[A-Za-z0-9._/-]+$")
IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
"""an OCI image tag (the distribution spec's grammar)"""
MODEL_VERSION = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$")
"""a BentoML model version or tag: a lowercase name, optionally ``:`` and a version"""


ENV_GIT_TOKEN = "UNEXRL_GIT_TOKEN"
"""a token git authenticates to an HTTPS remote with (GitHub, GitLab and Gitea take one as a basic-auth password)"""


class GitOpsError(RuntimeError):
    """The repository, branch or overlay cannot take this deployment; the message says what is missing."""


def overlay_path(environment: str) -> str:
    """The only file a deployment edits, relative to the repository root."""
    return f"k8s/overlays/{environment}/kustomization.yaml"


def deploy(
    repo: str,
    *,
    environment: str,
    model_version: str,
    image_tag: str,
    branch: str,
    message: str | None = None,
) -> str:
    """Point ``environment``'s overlay at ``image_tag`` / ``model_version`` on ``branch`` of ``repo``; return the commit.

    ``repo`` is a local path or a URL git can push to. The branch is created from the default branch when absent.
    A deployment that changes nothing still commits (``--allow-empty``), so every release has its own sha.
    """
    if not repo:
        raise GitOpsError(
            "no GitOps repository given (the pipeline parameter gitops_repo): nowhere to deploy"
        )
    if not re.fullmatch(ENVIRONMENT, environment):
        # checked before anything is pushed: the release record refuses any other name after the commit
        raise GitOpsError(f"environment {environment!r}: does not match {ENVIRONMENT}")
    if not branch or not _REF.match(branch) or ".." in branch or branch.startswith("-"):
        raise GitOpsError(
            f"branch {branch!r}: expected a plain name ([A-Za-z0-9._/-], no '..', not starting with '-')"
        )
    for name, value, grammar in (
        ("model_version", model_version, MODEL_VERSION),
        ("image_tag", image_tag, IMAGE_TAG),
    ):
        if not grammar.match(value):
            raise GitOpsError(f"{name} {value!r}: does not match {grammar.pattern}")
    auth = _credentials(os.environ, repo)
    with tempfile.TemporaryDirectory(prefix="unexrl-gitops-") as tmp:
        work = Path(tmp) / "repo"
        git(None, "clone", "--quiet", "--", repo, str(work), auth=auth)
        # the full ref: no suffix matches
        if git(work, "ls-remote", "origin", f"refs/heads/{branch}", auth=auth):
            git(work, "checkout", "--quiet", "-B", branch, f"origin/{branch}")
        else:
            git(work, "checkout", "--quiet", "-b", branch)
        target = work / overlay_path(environment)
        set_release(target, model_version=model_version, image_tag=image_tag)
        git(work, "add", "--", overlay_path(environment))
        text = message or f"deploy {environment}: model {model_version}, image {IMAGE_NAME}:{image_tag}"
        git(work, "commit", "--quiet", "--allow-empty", "-m", text)
        git(work, "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", auth=auth)
        return git(work, "rev-parse", "HEAD").strip()


def set_release(kustomization: Path, *, model_version: str, image_tag: str) -> None:
    """Edit the two release fields of one overlay in place; refuse an overlay without the serving image entry."""
    if not kustomization.is_file():
        raise GitOpsError(
            f"no overlay at {kustomization}: create k8s/overlays/<environment>/kustomization.yaml first"
        )
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # the Kustomize style: "  - name: ..." under a key
    yaml.width = 4096  # never re-wrap long lines
    doc = yaml.load(kustomization.read_text())
    if not isinstance(doc, dict):
        raise GitOpsError(f"{kustomization}: not a YAML mapping")
    images = doc.get("images") or []
    entries = [e for e in images if isinstance(e, dict) and e.get("name") == IMAGE_NAME]
    if len(entries) != 1:
        raise GitOpsError(
            f"{kustomization}: expected exactly one `images:` entry with name: {IMAGE_NAME}, "
            f"found {len(entries)}"
        )
    entries[0]["newTag"] = image_tag
    if doc.get("commonAnnotations") is None:
        doc["commonAnnotations"] = {}
    doc["commonAnnotations"][ANNOTATION] = model_version
    text = io.StringIO()
    yaml.dump(doc, text)
    atomic_write_text(kustomization, text.getvalue())


def git(cwd: Path | None, *args: str, auth: Mapping[str, str] | None = None) -> str:
    """Run git in ``cwd`` as the pipeline's author, never prompting; stdout, or GitOpsError with git's message.
    ``auth``: the remote's credentials (:func:`_credentials`), for the commands that reach it.

    Callers put ``--`` before positional arguments that come from outside (a repository URL, a path), so a value
    starting with ``-`` cannot reach git as an option."""
    env = {**os.environ, **_AUTHOR, "GIT_TERMINAL_PROMPT": "0", **(auth or {})}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise GitOpsError(
            f"git {' '.join(args)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


def _credentials(environ: Mapping[str, str], remote: str) -> dict[str, str]:
    """git's environment for the token in ``environ`` and ``remote``: an ``http.<remote's origin>/.extraHeader``
    with it as the basic-auth password, sent to that host only, after any configuration the environment already
    gives git (``GIT_CONFIG_COUNT``, ``GIT_CONFIG_KEY_<n>``, ``GIT_CONFIG_VALUE_<n>``, read since git 2.31);
    nothing without a token. A token with a remote that is not HTTPS is refused: it would go out in clear."""
    token = environ.get(ENV_GIT_TOKEN, "")
    if not token:
        return {}
    if not token.isprintable() or token != token.strip():
        raise GitOpsError(
            f"{ENV_GIT_TOKEN}: a token is one line of printable characters without surrounding space"
        )
    url = urlsplit(remote)
    if url.scheme != "https" or not url.hostname or url.username or url.password:
        raise GitOpsError(
            f"{ENV_GIT_TOKEN} is set but the GitOps repository is not an https:// URL without credentials in it: "
            "the token is sent over HTTPS only"
        )
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    n = int(environ.get("GIT_CONFIG_COUNT") or 0)
    return {
        "GIT_CONFIG_COUNT": str(n + 1),
        f"GIT_CONFIG_KEY_{n}": f"http.https://{url.netloc}/.extraHeader",
        f"GIT_CONFIG_VALUE_{n}": f"Authorization: Basic {basic}",
    }
