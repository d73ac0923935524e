"""Signed artifact manifests: who made an artifact, not only what is in it (docs/security.md).

A manifest lists the sha256 of every file, so a changed file is refused; but whoever can write the artifact can
also rewrite the manifest with the new hashes (a self-consistent tamper). A signature closes that: the pipeline
signs ``manifest.json``'s bytes with an ed25519 private key (``manifest.sig`` beside it), and an environment that
trusts only its pipeline's public keys refuses an artifact whose manifest is unsigned or signed by anyone else.

    UNEXRL_SIGNING_KEY_FILE      where artifacts are written (the pipeline): PEM private key (from a Secret);
                                 set but absent: nothing is signed (the consumer is where trust is enforced).
                                 A trainer holding it also signs its checkpoints and resumes only from
                                 checkpoints signed with it (unexrl/train/checkpoint.py)
    UNEXRL_ARTIFACT_PUBLIC_KEYS  where artifacts are loaded (serving, packaging): PEM public key(s), one or more
                                 concatenated; set: a valid signature by one of them is required (staging, prod);
                                 unset: signatures are not checked (the embedded default)
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from unexrl.contracts import files
from unexrl.contracts.base import ContractError
from unexrl.io import UnreadableFile, atomic_write_bytes, read_regular_file

log = logging.getLogger(__name__)

ENV_SIGNING_KEY = "UNEXRL_SIGNING_KEY_FILE"
ENV_PUBLIC_KEYS = "UNEXRL_ARTIFACT_PUBLIC_KEYS"
SIGNATURE_MAX_BYTES = 1024
"""a signature file's size at most (an ed25519 signature is 88 bytes of base64): a larger one is refused unread"""
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class SignatureError(ContractError):
    """An artifact this environment may not trust: unsigned, or not signed by a trusted key; or a bad key file."""


def generate_keys(out_dir: Path) -> tuple[Path, Path]:
    """A new ed25519 key pair: ``private.pem`` (mode 0600, for the pipeline's Secret) and ``public.pem``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = out_dir / "private.pem", out_dir / "public.pem"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(private, pem, mode=0o600)
    atomic_write_bytes(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return private, public


def _signing_key(environ: Mapping[str, str]) -> Ed25519PrivateKey | None:
    key_file = environ.get(ENV_SIGNING_KEY)
    if not key_file:
        return None
    if not Path(key_file).is_file():
        log.warning("%s=%s does not exist: nothing is signed", ENV_SIGNING_KEY, key_file)
        return None
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{ENV_SIGNING_KEY}={key_file}: not an ed25519 private key")
    return key


def sign_file(
    path: Path, signature: Path, environ: Mapping[str, str] = os.environ, purpose: bytes = b""
) -> bool:
    """Sign ``purpose`` followed by the bytes of ``path`` into ``signature`` (base64) when a signing key is
    configured; True if it signed. ``purpose`` keeps one kind of file's signature from passing for another's."""
    key = _signing_key(environ)
    if key is None:
        return False
    atomic_write_bytes(signature, base64.b64encode(key.sign(purpose + Path(path).read_bytes())) + b"\n")
    return True


def sign_manifest(directory: Path, environ: Mapping[str, str] = os.environ) -> bool:
    """Sign ``directory``/manifest.json when a signing key is configured; True if it signed."""
    return sign_file(Path(directory) / files.MANIFEST, Path(directory) / files.SIGNATURE, environ)


def signer_keys(environ: Mapping[str, str] = os.environ) -> list[Ed25519PublicKey] | None:
    """The public half of this process's signing key, or None: a trainer that signs its checkpoints loads only
    checkpoints it (or its pipeline) signed."""
    key = _signing_key(environ)
    return None if key is None else [key.public_key()]


def trusted_keys(environ: Mapping[str, str] = os.environ) -> list[Ed25519PublicKey] | None:
    """The public keys this environment trusts, or None when it checks no signatures."""
    key_file = environ.get(ENV_PUBLIC_KEYS)
    if not key_file:
        return None
    try:
        blocks = _PEM_BLOCK.findall(Path(key_file).read_bytes())
    except OSError as err:
        raise SignatureError(f"{ENV_PUBLIC_KEYS}={key_file}: {err.strerror}") from None
    try:
        keys = [serialization.load_pem_public_key(b) for b in blocks]
    except ValueError:
        keys = []
    if not keys or not all(isinstance(k, Ed25519PublicKey) for k in keys):
        raise SignatureError(f"{ENV_PUBLIC_KEYS}={key_file}: expected one or more ed25519 public keys (PEM)")
    return keys  # type: ignore[return-value]


def verify_signature(
    data: bytes, signature: Path, keys: list[Ed25519PublicKey] | None, what: str, purpose: bytes = b""
) -> None:
    """Refuse ``data`` (``what``'s bytes, as read once) unless no ``keys`` are required (None), or the file
    ``signature`` is a valid signature of exactly ``purpose`` and these bytes by one of ``keys``."""
    if keys is None:
        return
    try:
        text, _ = read_regular_file(signature, SIGNATURE_MAX_BYTES)
    except FileNotFoundError:
        raise SignatureError(
            f"{what}: no {signature.name}; this environment loads signed files only"
        ) from None
    except (UnreadableFile, OSError) as err:
        raise SignatureError(f"{what}: {signature.name} unreadable ({err})") from None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise SignatureError(f"{signature}: not a base64 signature") from None
    for key in keys:
        try:
            key.verify(raw, purpose + data)
            return
        except InvalidSignature:
            continue
    raise SignatureError(
        f"{what}: {signature.name} does not verify with any trusted key; refusing what this environment's "
        "pipeline did not sign"
    )


def verify_manifest(directory: Path, manifest: bytes, keys: list[Ed25519PublicKey] | None) -> None:
    """Refuse ``manifest`` (the bytes of ``directory``/manifest.json, as read once) unless no ``keys`` are
    required (None), or ``manifest.sig`` is a valid signature of exactly these bytes by one of ``keys``."""
    verify_signature(manifest, Path(directory) / files.SIGNATURE, keys, str(directory))
