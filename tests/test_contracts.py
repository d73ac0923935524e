"""The contract helper (unexrl/contracts/base.py) and the release records: what a reader refuses, and that a
write is all or nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError, read_artifact
from unexrl.contracts.base import ContractError
from unexrl.contracts.release import BentoRecord, ReleaseRecord
from unexrl.pipeline import registry
from unexrl.policies.artifact import save_weight_policy
from unexrl.policies.weights import WeightPolicy


def test_write_is_atomic_and_returns_the_files_sha256(tmp_path: Path) -> None:
    record = BentoRecord(
        bento_tag="unexrl-serving:abc",
        model_tag="unexrl-policy:v1",
        model_version="v1",
        image_tag="abc",
        bentoml_home="",
        archive_sha256="0" * 64,
    )
    digest = record.write(tmp_path / "bento.json")
    assert digest == hashlib.sha256((tmp_path / "bento.json").read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["bento.json"]  # no temporary file left
    assert BentoRecord.read(tmp_path / "bento.json") == record


def test_a_missing_or_malformed_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=f"{tmp_path / 'nothing.json'}: no ReleaseRecord here"):
        ReleaseRecord.read(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ContractError, match="bad.json: not a valid ReleaseRecord: .*Invalid JSON"):
        ReleaseRecord.read(tmp_path / "bad.json")


@pytest.mark.parametrize("version", ["../../outside", "/abs", "-rf", ".hidden", ""])
def test_a_registry_record_cannot_point_outside_the_registry(tmp_path: Path, version: str) -> None:
    """The record names the released artifact's directory under <registry>/models/: one plain path component."""
    record = {
        "schema_version": 1,
        "environment": "staging",
        "model_version": version,
        "deployed_at": "2026-12-02T00:00:00Z",
    }
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "staging.json").write_text(json.dumps(record))
    with pytest.raises(ContractError, match="model_version: String should match pattern"):
        registry.incumbent(tmp_path, "staging")


@pytest.mark.parametrize("environment", ["../staging", "Staging", "prod_eu", ""])
def test_an_environment_outside_the_release_grammar_is_refused_before_any_read(
    tmp_path: Path, environment: str
) -> None:
    """The registry reads <registry>/environments/<environment>.json: a name the release record would refuse (or one
    that leaves the folder) is refused before the incumbent is looked up or a deployment recorded."""
    with pytest.raises(ValueError, match="does not match"):
        registry.deployed(tmp_path, environment)


def test_the_registry_holds_each_version_as_that_artifact(tmp_path: Path, small_cfg: Config) -> None:
    """A record's model version is its artifact's: registering under another version, or an entry whose artifact
    was replaced after it was registered, is refused before it becomes an incumbent."""
    weights = torch.full((1, sum(small_cfg.cascade.action_dims)), 0.5)
    artifact = save_weight_policy(WeightPolicy(weights, small_cfg.cascade), tmp_path / "a", small_cfg, "cem")
    other = save_weight_policy(WeightPolicy(weights * 0, small_cfg.cascade), tmp_path / "b", small_cfg, "cem")
    root = tmp_path / "registry"
    with pytest.raises(ArtifactError, match="but the registry names it 0123456789abcdef"):
        registry.register(
            root, artifact, ReleaseRecord(environment="staging", model_version="0123456789abcdef")
        )
    version = read_artifact(artifact).version
    registry.register(root, artifact, ReleaseRecord(environment="staging", model_version=version))
    entry = registry.incumbent(root, "staging")
    assert entry is not None and read_artifact(entry).sha256 == read_artifact(artifact).sha256
    shutil.rmtree(entry)
    shutil.copytree(other, entry)  # a valid artifact, but not the one released under this version
    with pytest.raises(ArtifactError, match=f"artifact version {read_artifact(other).version}, but"):
        registry.incumbent(root, "staging")
    with pytest.raises(ArtifactError, match="but the registry names it"):
        registry.resolve_incumbent(str(root), "staging", tmp_path / "incumbent")
