"""The Feast registry a pipeline run published for serving, checked before a serving replica uses it.

Each run applies and materialises with a registry of its own, then publishes it (:func:`publish`, beside its
signature when the pipeline signs). The file crosses a trust boundary on its way to serving: whoever can write the
volume it is published on can replace it, and Feast runs code that a registry carries (on-demand, stream and label
views' transformations, validation references' profilers, data source classes imported by name). So a replica
never hands the published file to Feast. :class:`PublishedRegistry` reads it once, refuses it unless it is signed
by a trusted key (where the environment requires signatures, as for artifacts: unexrl.contracts.signing) and holds
only what the definitions make (feature views and services, entities, file, push and Spark sources of one
project), and writes that copy to a private file, which Feast reads; it does so again when the published file
changes. A refused publication leaves the replica on its last good copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from unexrl.contracts.base import ContractError
from unexrl.contracts.signing import sign_file, trusted_keys, verify_signature
from unexrl.io import atomic_file, atomic_write_bytes

log = logging.getLogger(__name__)

SERVING = "serving"
"""the Feast environment of serving replicas (feature_repo/environments/serving.yaml)"""
ENV_FEAST_REGISTRY = "UNEXRL_FEAST_REGISTRY"
"""the published registry file (the ``serving`` environment), or ``production``'s registry URI"""
SIGNATURE_SUFFIX = ".sig"
SOURCE_CLASSES = frozenset(
    {
        "",
        "feast.infra.offline_stores.file_source.FileSource",
        "feast.data_source.PushSource",
        "feast.infra.offline_stores.contrib.spark_offline_store.spark_source.SparkSource",
    }
)
"""the data source classes a published registry may name (Feast imports a source's class by this name)"""
CODE_CARRIERS = (
    "on_demand_feature_views",
    "stream_feature_views",
    "label_views",
    "feature_tables",
    "saved_datasets",
    "validation_references",
    "permissions",
)
"""registry fields the definitions never fill; several carry code Feast would run (dill, exec)"""


class RegistryRefused(ContractError):
    """A published registry that a serving replica will not use."""


def signature_of(registry: Path) -> Path:
    return registry.with_name(registry.name + SIGNATURE_SUFFIX)


def publish(registry: Path, target: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Copy a run's ``registry`` file to ``target`` in one rename, signed beside it when the pipeline holds a
    signing key (the signature first: a replica that reads the new registry with the old signature refuses it and
    tries again at its next check)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as staged:
        shutil.copyfile(registry, staged)
        sign_file(staged, signature_of(target), environ)
    return target


def check_registry(data: bytes, project: str, where: str) -> None:
    """Refuse registry bytes that do not parse, name another project, or hold anything the definitions never
    make (module docstring)."""
    from feast.protos.feast.core.Registry_pb2 import Registry
    from google.protobuf.message import DecodeError

    registry = Registry()
    try:
        registry.ParseFromString(data)
    except DecodeError as err:
        raise RegistryRefused(f"{where}: not a Feast registry ({err})") from None
    filled = [name for name in CODE_CARRIERS if len(getattr(registry, name))]
    if filled:
        raise RegistryRefused(f"{where}: holds {', '.join(filled)}, which the definitions never make")
    sources = [*registry.data_sources]
    for view in registry.feature_views:
        sources += [view.spec.batch_source, view.spec.stream_source]
    classes = {s.data_source_class_type for s in sources} - SOURCE_CLASSES
    if classes:
        raise RegistryRefused(f"{where}: data sources of the classes {sorted(classes)}")
    projects = {v.spec.project for v in registry.feature_views} | {p.spec.name for p in registry.projects}
    if projects - {project}:
        raise RegistryRefused(
            f"{where}: objects of the projects {sorted(projects - {project})}, not {project}"
        )


class PublishedRegistry:
    """A private, checked copy of the registry published at ``published`` (the one Feast opens)."""

    def __init__(self, published: Path, project: str, environ: Mapping[str, str] = os.environ) -> None:
        self.published = Path(published)
        self.project = project
        self.copy = Path(tempfile.mkdtemp(prefix="unexrl-registry-")) / "registry.db"
        self._keys = trusted_keys(environ)
        self._seen: tuple[int, int] | None = None

    def sync(self) -> bool:
        """Copy the published registry once checked, if it changed since the last copy; True if the copy
        changed. Raises RegistryRefused (or OSError: nothing published yet), leaving the copy as it was."""
        stat = self.published.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._seen:
            return False
        data = self.published.read_bytes()
        where = str(self.published)
        verify_signature(data, signature_of(self.published), self._keys, where)
        check_registry(data, self.project, where)
        atomic_write_bytes(self.copy, data)
        self._seen = stamp
        log.info("feature registry: using %s as published (%d bytes)", where, len(data))
        return True
