"""Signed manifests: where the environment names trusted keys, only artifacts its pipeline signed load. The attack
is the self-consistent tamper: new weights and the manifest re-hashed to match, which hashes alone accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError
from unexrl.contracts.signing import ENV_PUBLIC_KEYS, ENV_SIGNING_KEY, generate_keys
from unexrl.io import sha256_file
from unexrl.policies.artifact import load_policy, save_weight_policy
from unexrl.policies.weights import WeightPolicy


def signed_artifact(cfg: Config, out: Path, key: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A weights artifact written by a process that holds ``key`` (as the pipeline's steps do)."""
    monkeypatch.setenv(ENV_SIGNING_KEY, str(key))
    policy = WeightPolicy(torch.full((1, sum(cfg.cascade.action_dims)), 0.5), cfg.cascade)
    path = save_weight_policy(policy, out, cfg, algorithm="cem")
    monkeypatch.delenv(ENV_SIGNING_KEY)
    assert (path / "manifest.sig").is_file()
    return path


def rehash(path: Path, weights: torch.Tensor) -> None:
    """The self-consistent tamper: other weights, and the manifest's hash of them recomputed."""
    torch.save({"weights": weights}, path / "weights.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["weights.pt"] = sha256_file(path / "weights.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_signed_environment_refuses_a_rehashed_artifact(
    small_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = generate_keys(tmp_path / "keys")
    assert private.stat().st_mode & 0o077 == 0  # the private key is readable by its owner only
    path = signed_artifact(small_cfg, tmp_path / "a", private, monkeypatch)
    monkeypatch.setenv(ENV_PUBLIC_KEYS, str(public))
    assert load_policy(path, small_cfg).weights.eq(0.5).all()
    rehash(path, torch.zeros(1, sum(small_cfg.cascade.action_dims)))
    with pytest.raises(ArtifactError, match="does not verify"):
        load_policy(path, small_cfg)
    # the embedded default checks hashes only: the same tamper passes there, which is why staging/prod sign
    monkeypatch.delenv(ENV_PUBLIC_KEYS)
    assert load_policy(path, small_cfg).weights.eq(0).all()


def test_unsigned_and_foreign_artifacts_are_refused(
    small_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = generate_keys(tmp_path / "ours"), generate_keys(tmp_path / "theirs")
    unsigned = save_weight_policy(
        WeightPolicy(torch.zeros(1, sum(small_cfg.cascade.action_dims)), small_cfg.cascade),
        tmp_path / "unsigned",
        small_cfg,
        algorithm="cem",
    )
    foreign = signed_artifact(small_cfg, tmp_path / "foreign", theirs[0], monkeypatch)
    monkeypatch.setenv(ENV_PUBLIC_KEYS, str(ours[1]))
    with pytest.raises(ArtifactError, match="no manifest.sig"):
        load_policy(unsigned, small_cfg)
    with pytest.raises(ArtifactError, match="does not verify"):
        load_policy(foreign, small_cfg)
    # a key rotation: both public keys trusted at once
    both = tmp_path / "both.pem"
    both.write_bytes(ours[1].read_bytes() + theirs[1].read_bytes())
    monkeypatch.setenv(ENV_PUBLIC_KEYS, str(both))
    load_policy(foreign, small_cfg)
    # a signature file that is not one, and a key file that holds no key, are named
    (foreign / "manifest.sig").write_text("not base64!\n")
    with pytest.raises(ArtifactError, match="manifest.sig: not a base64 signature"):
        load_policy(foreign, small_cfg)
    for text in ("nothing here\n", "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"):
        both.write_text(text)
        with pytest.raises(ArtifactError, match="ed25519 public keys"):
            load_policy(foreign, small_cfg)


def test_a_manifest_cannot_list_its_signature(small_cfg: Config, tmp_path: Path) -> None:
    path = save_weight_policy(
        WeightPolicy(torch.zeros(1, sum(small_cfg.cascade.action_dims)), small_cfg.cascade),
        tmp_path / "a",
        small_cfg,
        algorithm="cem",
    )
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["manifest.sig"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="plain path inside the artifact"):
        load_policy(path, small_cfg)
