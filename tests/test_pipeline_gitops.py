"""unexrl.gitops.deploy against real git repositories: one commit on the branch, exactly two fields changed."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from unexrl.gitops import ANNOTATION, ENV_GIT_TOKEN, GitOpsError, deploy
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


TOKEN = "s3cret-token"


class _GitWithToken(BaseHTTPRequestHandler):
    """git's smart HTTP (``git http-backend``, as a forge runs it) behind basic authentication with TOKEN."""

    root: Path

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, *args: object) -> None:
        pass

    def _serve(self) -> None:
        expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cgi = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REMOTE_USER": "pipeline",  # an authenticated user may push
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=cgi, capture_output=True, check=True
        ).stdout
        head, payload = re.split(rb"\r?\n\r?\n", out, maxsplit=1)
        fields = [line.decode().split(":", 1) for line in head.splitlines()]
        status = next((int(v.split()[0]) for k, v in fields if k.lower() == "status"), 200)
        self.send_response(status)
        for k, v in fields:
            if k.lower() != "status":
                self.send_header(k, v.strip())
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "forge.crt", tmp_path / "forge.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def forge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(an HTTPS URL of a manifests repository that needs TOKEN, the bare repository behind it); git trusts its
    self-signed certificate through GIT_SSL_CAINFO."""
    bare = make_repo(tmp_path)
    cert, key = _self_signed(tmp_path)
    handler = type("Handler", (_GitWithToken,), {"root": bare.parent})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    monkeypatch.setenv("GIT_SSL_CAINFO", str(cert))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_port}/{bare.name}", bare
    finally:
        server.shutdown()


def test_deploy_authenticates_to_an_https_remote_with_the_token(
    forge: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote that needs credentials refuses the push without UNEXRL_GIT_TOKEN (git never prompts) and takes it
    with the token, which reaches git through its environment only: not in the URL, not among its arguments."""
    url, bare = forge
    release = {
        "environment": "staging",
        "model_version": "m:1",
        "image_tag": "t1",
        "branch": "release/staging",
    }
    monkeypatch.delenv(ENV_GIT_TOKEN, raising=False)
    with pytest.raises(GitOpsError, match="Authentication failed|could not read Username|401"):
        deploy(url, **release)
    monkeypatch.setenv(ENV_GIT_TOKEN, TOKEN)
    sha = deploy(url, **release)
    assert git(bare, "rev-parse", "release/staging").strip() == sha
    monkeypatch.setenv(ENV_GIT_TOKEN, "two\nlines")
    with pytest.raises(GitOpsError, match=ENV_GIT_TOKEN):
        deploy(url, **release)
    monkeypatch.setenv(ENV_GIT_TOKEN, TOKEN)  # never sent in clear
    with pytest.raises(GitOpsError, match="not an https:// URL"):
        deploy(url.replace("https://", "http://"), **release)
