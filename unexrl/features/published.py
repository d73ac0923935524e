"""The Feast registry a pipeline run published for serving, checked before a serving replica uses it.

Each run applies and materialises with a registry of its own, then publishes it (:func:`publish`, beside its
signature when the pipeline signs). The file crosses a trust boundary on its way to serving: whoever can write the
volume it is published on can replace it, and Feast runs code that a registry carries (a feature view's
transformation, on-demand and stream views, validation references' profilers, a data source class imported by its
name). So a replica never hands the published file to Feast. :class:`PublishedRegistry` reads it once (a
regular file of a bounded size: never a link, a pipe or a device, which could block the replica), refuses it
unless it is signed by a trusted key (where the environment requires signatures, as for artifacts:
unexrl.contracts.signing) and holds nothing but the messages and fields that applying and materialising the
definitions writes, file and push sources, and one project (:func:`check_registry`), and writes that copy to a
private file, which Feast reads; it does so again when the published file changes (the replica looks every
``features.item_cache_check_s``). A refused publication leaves the replica on its last good copy, and is not read
again until the file or its signature changes. A replica never moves back: a registry last updated before the
copy it uses (an older one the pipeline signed, copied back onto the volume) is refused. A replica that starts
has no copy yet and takes the signed registry it finds, older or not: the replay that is not stopped (it moves
the features' definitions and intervals back, no code).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from unexrl.contracts.base import ContractError
from unexrl.contracts.signing import SignatureError, sign_file, signer_keys, trusted_keys, verify_signature
from unexrl.io import UnreadableFile, atomic_file, atomic_write_bytes, read_regular_file

if TYPE_CHECKING:
    from feast.protos.feast.core.Registry_pb2 import Registry
    from google.protobuf.message import Message

log = logging.getLogger(__name__)
M = TypeVar("M", bound="Message")

SERVING = "serving"
"""the Feast environment of serving replicas (feature_repo/environments/serving.yaml)"""
ENV_FEAST_REGISTRY = "UNEXRL_FEAST_REGISTRY"
"""the published registry file (the ``serving`` environment), or ``production``'s registry URI"""
SIGNATURE_SUFFIX = ".sig"
REGISTRY_MAX_BYTES = 16 * 2**20
"""a published registry's size at most (the definitions' is a few kilobytes): a larger one is refused unread"""
SIGNATURE_PURPOSE = b"unexrl feast registry\n"
"""signed before the registry's bytes, so that no other signed file's signature passes for a registry's"""


def _fields(names: str) -> frozenset[str]:
    return frozenset(names.split())


_TIMES = "created_timestamp last_updated_timestamp"
MADE_BY_DEFINITIONS: dict[str, frozenset[str]] = {
    "feast.core.Registry": _fields(
        "data_sources entities feature_services feature_view_version_history feature_views last_updated"
        " project_metadata projects registry_schema_version version_id"
    ),
    "feast.core.DataSource": _fields(
        "batch_source data_source_class_type file_options meta name project timestamp_field type"
    ),
    "feast.core.DataSource.FileOptions": _fields("uri"),
    "feast.core.DataSource.SourceMeta": _fields(_TIMES),
    "feast.core.Entity": _fields("meta spec"),
    "feast.core.EntityMeta": _fields(_TIMES),
    "feast.core.EntitySpecV2": _fields("description join_key name project value_type"),
    "feast.core.FeatureService": _fields("meta spec"),
    "feast.core.FeatureServiceMeta": _fields(_TIMES),
    "feast.core.FeatureServiceSpec": _fields("description features name project"),
    "feast.core.FeatureViewProjection": _fields("batch_source feature_columns feature_view_name view_type"),
    "feast.core.FeatureSpecV2": _fields("description name value_type"),
    "feast.core.FeatureView": _fields("meta spec"),
    "feast.core.FeatureViewMeta": _fields(f"{_TIMES} materialization_intervals state"),
    "feast.core.MaterializationInterval": _fields("end_time start_time"),
    "feast.core.FeatureViewSpec": _fields(
        "batch_source description entities entity_columns features name online project stream_source ttl"
        " version"
    ),
    "feast.core.FeatureViewVersionHistory": _fields("records"),
    "feast.core.FeatureViewVersionRecord": _fields(
        "created_timestamp feature_view_name feature_view_proto feature_view_type project_id version_id"
    ),
    "feast.core.Project": _fields("meta spec"),
    "feast.core.ProjectMeta": _fields(_TIMES),
    "feast.core.ProjectMetadata": _fields("project project_uuid"),
    "feast.core.ProjectSpec": _fields("name"),
    "google.protobuf.Duration": _fields("nanos seconds"),
    "google.protobuf.Timestamp": _fields("nanos seconds"),
}
"""every message and field that applying and materialising feature_repo/definitions.py writes (Feast 0.67),
found by walking such registries; anything else (a view's transformation, source views, tags, another kind of
view or source) is refused rather than judged, since several carry code Feast would run (dill, exec, a class
imported by name). A Feast upgrade that writes more fails tests/test_features.py until each new field is looked
at and added here."""
ALLOWED_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("feast.core.DataSource", "type"): frozenset({"BATCH_FILE", "PUSH_SOURCE"}),
    ("feast.core.DataSource", "data_source_class_type"): frozenset(
        {"feast.infra.offline_stores.file_source.FileSource", "feast.data_source.PushSource"}
    ),
    ("feast.core.FeatureViewProjection", "view_type"): frozenset({"featureView"}),
    ("feast.core.FeatureViewVersionRecord", "feature_view_type"): frozenset({"feature_view"}),
}
"""fields whose value picks what Feast builds: only the file and push sources and the plain feature views"""
PROJECT_FIELDS = frozenset(
    {
        ("feast.core.DataSource", "project"),
        ("feast.core.EntitySpecV2", "project"),
        ("feast.core.FeatureServiceSpec", "project"),
        ("feast.core.FeatureViewSpec", "project"),
        ("feast.core.FeatureViewVersionRecord", "project_id"),
        ("feast.core.ProjectMetadata", "project"),
        ("feast.core.ProjectSpec", "name"),
    }
)
"""fields naming a project, which must be the serving store's"""


Stamp = tuple[int, int, int]
"""a published file's inode, modification time and size: each publication is a new file (a rename)"""


def _stamp(status: os.stat_result) -> Stamp:
    return status.st_ino, status.st_mtime_ns, status.st_size


def _stamp_if_any(path: Path) -> Stamp | None:
    try:
        return _stamp(path.lstat())
    except FileNotFoundError:
        return None


class RegistryRefused(ContractError):
    """A published registry that a serving replica will not use."""


def signature_of(registry: Path) -> Path:
    return registry.with_name(registry.name + SIGNATURE_SUFFIX)


def publish(registry: Path, target: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Copy a run's ``registry`` file to ``target`` in one rename, signed beside it when the pipeline holds a
    signing key (an unsigned publication removes the last signature). Two runs publishing at once could leave one's
    registry beside the other's signature (each signs, then renames); the publisher whose registry is in place
    checks the pair and publishes again until it holds, so the last registry renamed wins, signed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = Path(registry).read_bytes()
    keys = signer_keys(environ)
    for _ in range(3):
        with atomic_file(target) as staged:
            staged.write_bytes(data)
            sign_file(staged, signature_of(target), environ, SIGNATURE_PURPOSE)
        if keys is None:
            signature_of(target).unlink(missing_ok=True)
            return target
        if target.read_bytes() != data:
            return target  # a later publication replaced this one
        try:
            verify_signature(data, signature_of(target), keys, str(target), SIGNATURE_PURPOSE)
            return target
        except SignatureError:
            log.warning(
                "%s: another publication's signature landed beside this one; publishing again", target
            )
    raise RegistryRefused(f"{target}: other publications kept replacing this one's signature")


def check_registry(data: bytes, project: str, where: str) -> Registry:
    """The registry that ``data`` holds; refused if the bytes do not parse, or hold anything the definitions
    never make (:data:`MADE_BY_DEFINITIONS`, :data:`ALLOWED_VALUES`) or anything of a project other than
    ``project``."""
    from feast.protos.feast.core.Registry_pb2 import Registry

    registry = _parse(Registry, data, where)
    _check_message(registry, project, f"{where}: registry")
    return registry


def _parse(message: type[M], data: bytes, where: str) -> M:
    from google.protobuf.message import DecodeError

    parsed = message()
    try:
        parsed.ParseFromString(data)
    except DecodeError as err:
        raise RegistryRefused(f"{where}: not a Feast {message.DESCRIPTOR.name} ({err})") from None
    return parsed


def _check_message(message: Message, project: str, where: str) -> None:
    from feast.protos.feast.core.FeatureView_pb2 import FeatureView
    from google.protobuf.unknown_fields import UnknownFieldSet

    kind = message.DESCRIPTOR.full_name
    if kind not in MADE_BY_DEFINITIONS:
        raise RegistryRefused(f"{where}: a {kind}, which the definitions never make")
    unknown = sorted({f.field_number for f in UnknownFieldSet(message)})
    if unknown:  # invisible to the walk below, and copied to Feast with the rest: nothing unread passes
        raise RegistryRefused(f"{where}: fields numbered {unknown}, unknown to this Feast's {kind}")
    for field, value in message.ListFields():
        at = f"{where}.{field.name}"
        if field.name not in MADE_BY_DEFINITIONS[kind]:
            raise RegistryRefused(f"{at}: set, and the definitions never set it")
        if field.message_type is not None:
            for i, item in enumerate(value if field.is_repeated else [value]):
                _check_message(item, project, f"{at}[{i}]" if field.is_repeated else at)
            continue
        shown = value
        if field.enum_type is not None:  # an open enum: a number it does not name stays a number
            shown = getattr(field.enum_type.values_by_number.get(value), "name", value)
        allowed = ALLOWED_VALUES.get((kind, field.name))
        if allowed is not None and shown not in allowed:
            raise RegistryRefused(f"{at}: {shown!r}, where the definitions make only {sorted(allowed)}")
        if (kind, field.name) in PROJECT_FIELDS and value != project:
            raise RegistryRefused(f"{at}: of the project {value!r}, not {project!r}")
        if (kind, field.name) == ("feast.core.FeatureViewVersionRecord", "feature_view_proto"):
            _check_message(_parse(FeatureView, value, at), project, at)


class PublishedRegistry:
    """A private, checked copy of the registry published at ``published`` (the one Feast opens), removed with
    this object."""

    def __init__(self, published: Path, project: str, environ: Mapping[str, str] = os.environ) -> None:
        self.published = Path(published)
        self.project = project
        private = tempfile.mkdtemp(prefix="unexrl-registry-")
        weakref.finalize(self, shutil.rmtree, private, ignore_errors=True)
        self.copy = Path(private) / "registry.db"
        self._keys = trusted_keys(environ)
        self._seen: Stamp | None = None
        """the publication copied last"""
        self._updated: datetime | None = None
        """when the registry copied last was last updated (Feast stamps every commit): none older is taken"""
        self._refused: tuple[tuple[Stamp, Stamp | None], ContractError] | None = None
        """the publication (and signature) refused last, and why: asked again, a replica does not read it again"""
        self._lock = threading.Lock()

    def sync(self) -> bool:
        """Copy the published registry once checked, if it changed since the last copy; True if the copy
        changed. Raises RegistryRefused or SignatureError (or OSError: nothing published yet), leaving the copy
        as it was. Thread-safe: concurrent requests call it."""
        with self._lock:
            published = _stamp(self.published.lstat())
            if published == self._seen:
                return False
            current = (published, _stamp_if_any(signature_of(self.published)))
            if self._refused is not None and current == self._refused[0]:
                raise self._refused[1].with_traceback(None)  # the same files: refused again, unread
            try:
                data, status, updated = self._read_checked()
            except ContractError as err:
                self._refused = (current, err)
                raise
            atomic_write_bytes(self.copy, data)
            self._seen, self._updated, self._refused = _stamp(status), updated, None
        log.info("feature registry: using %s as published (%d bytes)", self.published, len(data))
        return True

    def _read_checked(self) -> tuple[bytes, os.stat_result, datetime]:
        """The published bytes, read once, the status of the file read and when the registry was last updated,
        if signed, made by the definitions and no older than the copy in use; else RegistryRefused or
        SignatureError."""
        where = str(self.published)
        try:
            data, status = read_regular_file(self.published, REGISTRY_MAX_BYTES)
        except UnreadableFile as err:
            raise RegistryRefused(str(err)) from None
        verify_signature(data, signature_of(self.published), self._keys, where, SIGNATURE_PURPOSE)
        updated = check_registry(data, self.project, where).last_updated.ToDatetime(UTC)
        if self._updated is not None and updated < self._updated:
            raise RegistryRefused(
                f"{where}: last updated {updated:%Y-%m-%d %H:%M:%S.%f} UTC, before the registry in use "
                f"({self._updated:%Y-%m-%d %H:%M:%S.%f} UTC); an older publication is not taken"
            )
        return data, status, updated
