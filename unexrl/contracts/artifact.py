"""A policy artifact's manifest: what every kind shares, and how an artifact directory is verified before any of
its files is opened.

    <dir>/manifest.json    ArtifactManifest (a kind's own model adds its fields: unexrl/artifacts.py lists the kinds)
    <dir>/manifest.sig     optional: its ed25519 signature (unexrl/contracts/signing.py), required where
                           the environment names trusted keys
    <dir>/<file>           every other file, listed in the manifest's ``files`` with its sha256

The manifest layer knows no kind: it checks the common fields and the files; a kind's loader validates the same
document with its own model (a subclass here) and opens only the files it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Self, TypeVar

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from unexrl.config import Config
from unexrl.contracts import files
from unexrl.contracts.base import SHA256, STRICT, Contract, ContractError, Part
from unexrl.contracts.signing import sign_manifest, trusted_keys, verify_manifest
from unexrl.io import sha256_file


class ArtifactError(ContractError):
    """An artifact that is incomplete, tampered with, or built for another cascade."""


class StageSignature(Part):
    """What a policy is bound to at one stage: its name, heads (the action's order) and candidate count."""

    name: str
    heads: list[str]
    keep: int


def stage_signature(cfg: Config) -> list[StageSignature]:
    return [StageSignature(name=s.name, heads=list(s.heads), keep=s.keep) for s in cfg.cascade.stages]


class ArtifactManifest(Contract):
    """The fields every artifact kind has. Read generically, fields of the kind are kept as they are (``extra``
    allowed here only); a kind's subclass forbids anything it does not declare."""

    model_config = STRICT | ConfigDict(extra="allow")
    KIND: ClassVar[str | None] = None
    """a kind's subclass: the ``kind`` it reads"""

    kind: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    algorithm: str
    stages: list[StageSignature] = Field(min_length=1)
    pool_size: int = Field(gt=0)
    action_bounds: tuple[float, float]
    config: dict[str, Any]
    """the full config the policy was built with (unexrl.config.Config)"""
    created_at: datetime
    seen_seeds: list[int] = Field(min_length=1)
    """every simulator seed whose sessions made this policy (training, validation, the logs'): an evaluation
    on any of them is not held out (unexrl/pipeline/evaluation.py refuses it)"""
    files: dict[str, str] = Field(min_length=1)
    """every file of the artifact but the manifest, by its path relative to the directory: sha256"""
    _sha256: str | None = PrivateAttr(default=None)

    @property
    def sha256(self) -> str:
        """The sha256 of the manifest.json bytes :func:`read_artifact` verified this from: the artifact's identity
        (the manifest lists every file's hash), as the gate's decision and the model store name it. Being part of
        the model's state, it makes a verified manifest unequal to the same document read unverified."""
        if self._sha256 is None:
            raise ArtifactError("a manifest not read by read_artifact has no verified identity")
        return self._sha256

    @property
    def version(self) -> str:
        """The version the artifact is served as: the first 16 hex digits of :attr:`sha256`."""
        return self.sha256[:16]

    @model_validator(mode="after")
    def _known_version(self) -> Self:
        """Read generically, a manifest of any kind's version passes (the common fields above are the same in
        each); a kind's model reads only its own version."""
        return self if type(self) is ArtifactManifest else super()._known_version()

    @field_validator("files")
    @classmethod
    def _plain_paths(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            path = PurePosixPath(name)
            if (
                path.is_absolute()
                or ".." in path.parts
                or "\\" in name
                or name in ("", ".", files.MANIFEST, files.SIGNATURE)
            ):
                raise ValueError(f"{name!r}: a listed file must be a plain path inside the artifact")
            if not re.fullmatch(SHA256, digest):
                raise ValueError(f"{name!r}: {digest!r} is not a sha256 hex digest")
        return value

    @classmethod
    def for_config(
        cls,
        cfg: Config,
        *,
        algorithm: str,
        files: dict[str, str],
        data_seeds: Sequence[int] = (),
        **fields: Any,
    ) -> Self:
        """The manifest of a policy built for ``cfg``: the common fields from the config, the kind's ``fields``.
        ``data_seeds``: the seeds of logged data it learned from, beside the config's training and validation."""
        return cls(
            kind=cls.KIND,
            algorithm=algorithm,
            stages=stage_signature(cfg),
            pool_size=cfg.cascade.pool_size,
            action_bounds=(cfg.cascade.action_low, cfg.cascade.action_high),
            config=cfg.to_dict(),
            created_at=datetime.now(UTC),
            seen_seeds=sorted({*cfg.seeds.train, *cfg.seeds.validation, *data_seeds}),
            files=files,
            **fields,
        )

    def publish(self, directory: Path) -> None:
        """Write this manifest into the artifact ``directory`` (its files already there), signed when this
        process holds a signing key."""
        self.write(Path(directory) / files.MANIFEST)
        sign_manifest(Path(directory))

    def read_listed(self, directory: Path, name: str) -> bytes:
        """The bytes of ``directory``/``name``: a loader reads a file only through this, so only what the manifest
        lists, and only the very bytes whose hash matches it (:func:`read_verified`)."""
        return read_verified(Path(directory), self.files, name)

    def trained_config(self) -> Config:
        """The config the policy was built with, validated."""
        try:
            return Config.model_validate_json(json.dumps(self.config))
        except ValueError as err:
            raise ArtifactError(f"the artifact's config is not a valid config: {err}") from None

    def check_compatible(self, cfg: Config, where: Path) -> None:
        """Refuse an artifact whose stages, heads or sizes differ from the cascade it would run in."""
        ours = stage_signature(cfg)
        if self.stages != ours:
            theirs = [s.model_dump() for s in self.stages]
            raise ArtifactError(
                f"{where}: built for stages {theirs}, but the config has {[s.model_dump() for s in ours]}"
            )
        if self.pool_size != cfg.cascade.pool_size:
            raise ArtifactError(
                f"{where}: built for pool size {self.pool_size}, config has {cfg.cascade.pool_size}"
            )


M = TypeVar("M", bound=ArtifactManifest)


def peek_manifest(path: Path) -> ArtifactManifest:
    """The common manifest of ``path`` as written, its files **not** verified: enough to pick a kind's loader
    (which verifies everything before it opens a file). What a reader records about an artifact (its identity,
    its seen seeds) comes from the manifest the loader verified (``unexrl.artifacts.load_any_artifact``)."""
    path = Path(path)
    if not (path / files.MANIFEST).is_file():
        raise ArtifactError(f"{path}: no {files.MANIFEST}; not a policy artifact")
    try:
        return ArtifactManifest.read(path / files.MANIFEST)
    except ContractError as err:
        raise ArtifactError(str(err)) from None


def read_artifact(path: Path, model: type[M] = ArtifactManifest) -> M:  # type: ignore[assignment]
    """Read ``path``/manifest.json as ``model`` and verify the directory against it, before any file is used:
    the manifest is signed by a trusted key where this environment requires it; every file listed is a regular
    file inside the directory (no symlink, no way out), its sha256 matches, and nothing else is there. ``model``:
    a kind's manifest (refused unless the artifact is of that kind)."""
    path = Path(path)
    if not (path / files.MANIFEST).is_file():
        raise ArtifactError(f"{path}: no {files.MANIFEST}; not a policy artifact")
    data, where = (path / files.MANIFEST).read_bytes(), str(path / files.MANIFEST)  # read once: one document
    try:
        verify_manifest(path, data, trusted_keys())
        manifest = ArtifactManifest.parse(data, where)
        if model.KIND is not None and manifest.kind != model.KIND:
            raise ArtifactError(f"{path}: artifact kind {manifest.kind!r}, not {model.KIND}")
        verify_listed_files(path, manifest.files)
        verified = manifest if model is ArtifactManifest else model.parse(data, where)
        verified._sha256 = hashlib.sha256(data).hexdigest()
        return verified  # type: ignore[return-value]
    except ArtifactError:
        raise
    except ContractError as err:
        raise ArtifactError(str(err)) from None


def read_verified(path: Path, listed: dict[str, str], name: str, what: str = "artifact") -> bytes:
    """``path``/``name`` read once, its bytes hashed against ``listed`` (name: sha256): what a loader parses is what
    was hashed, so a file replaced after the directory was verified is refused, not loaded. ArtifactError names
    the file."""
    if name not in listed:
        raise ArtifactError(f"{path}: {name} is not listed in the manifest; nothing unlisted is loaded")
    file = path / name
    if file.is_symlink():
        raise ArtifactError(f"{path}: {name} is a symbolic link; the {what} must hold its own files")
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read {name} listed in the manifest: {err}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != listed[name]:
        raise ArtifactError(
            f"{file}: sha256 {actual[:12]}... does not match the manifest's {listed[name][:12]}...; "
            f"refusing the tampered {what}"
        )
    return data


def verify_listed_files(path: Path, listed: dict[str, str], what: str = "artifact") -> None:
    """``path`` holds exactly the files of ``listed`` (name: sha256) besides its manifest and signature: each a
    regular file inside it (no symlink, no way out) with that hash. Raises ArtifactError naming the file."""
    root = path.resolve()
    present = set()
    for folder, dirs, names in os.walk(path):  # links are not followed: each is refused where it stands
        for name in (*dirs, *names):
            if (Path(folder) / name).is_symlink():
                link = (Path(folder) / name).relative_to(path).as_posix()
                raise ArtifactError(f"{path}: {link} is a symbolic link; the {what} must hold its own files")
        present |= {(Path(folder) / name).relative_to(path).as_posix() for name in names}
    present -= {files.MANIFEST, files.SIGNATURE}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise ArtifactError(
            f"{path}: files {unlisted} are not in the manifest; refusing extra files in the {what}"
        )
    for name, expected in listed.items():
        file = path / name
        if file.is_symlink():
            raise ArtifactError(f"{path}: {name} is a symbolic link; the {what} must hold its own files")
        if not file.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing")
        if not file.resolve().is_relative_to(root):
            raise ArtifactError(f"{path}: {name} resolves outside the {what}")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{file}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                f"refusing the tampered {what}"
            )
