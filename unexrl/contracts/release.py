"""What package built (the bento) and what the registry records for each environment's deployment."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import Field

from unexrl.contracts.base import Contract

VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""a model version or image tag: one path component (the registry stores a version under its name), never
starting with '-' or '.'"""
TAG = r"^[a-z0-9][a-z0-9._-]*:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""a BentoML tag, ``<name>:<version>``"""
ENVIRONMENT = r"^[a-z0-9][a-z0-9-]*$"


class BentoRecord(Contract):
    """The serving Bento built around exactly one imported policy version (``package``)."""

    bento_tag: str = Field(pattern=TAG)
    model_tag: str = Field(pattern=TAG)
    """the BentoML model the Bento pins, ``<name>:<model_version>``"""
    model_version: str = Field(pattern=VERSION)
    """the policy artifact's version (derived from its manifest's hashes)"""
    image_tag: str = Field(pattern=VERSION)
    """the serving image's tag: the Bento's version"""
    bentoml_home: str
    """the BentoML store it was built into (empty: BentoML's default)"""
    archive_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the Bento exported beside this record (files.BENTO_ARCHIVE): the store above is the package step's
    own, so the archive is how the Bento leaves it"""


class ReleaseRecord(Contract):
    """One environment's deployed policy (``<registry>/environments/<environment>.json``)."""

    environment: str = Field(pattern=ENVIRONMENT)
    model_version: str = Field(pattern=VERSION)
    """the released artifact, stored at ``<registry>/models/<model_version>``"""
    deployed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    bento_tag: str | None = Field(default=None, pattern=TAG)
    image_tag: str | None = Field(default=None, pattern=VERSION)
    commit: str | None = None
    """the GitOps commit that is the deployment (None for a record seeded by hand, e.g. in tests)"""
    branch: str | None = None
    repo: str | None = None
