"""Policy artifacts round-trip, and tampered or mismatched ones are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_signing import rehash

from unexrl.config import Config, load_config
from unexrl.contracts import artifact
from unexrl.contracts.artifact import ArtifactError, peek_manifest, read_artifact
from unexrl.policies.artifact import load_policy, save_weight_policy
from unexrl.policies.weights import WeightPolicy
from unexrl.rl.actors import ACTORS_FILE, load_actor_policy


def _saved(cfg: Config, tmp_path: Path, group_by: str = "none") -> tuple[WeightPolicy, Path]:
    groups = 1 if group_by == "none" else len(cfg.world.user_types)
    policy = WeightPolicy(
        torch.linspace(-1, 1, groups * sum(cfg.cascade.action_dims)).view(groups, -1),
        cfg.cascade,
        group_by=group_by,
    )  # type: ignore[arg-type]
    return policy, save_weight_policy(policy, tmp_path / "artifact", cfg, algorithm="cem")


@pytest.mark.parametrize("group_by", ["none", "oracle_type"])
def test_round_trip(small_cfg: Config, tmp_path: Path, group_by: str) -> None:
    policy, path = _saved(small_cfg, tmp_path, group_by)
    loaded = load_policy(path, small_cfg)
    assert torch.equal(loaded.weights, policy.weights)
    assert loaded.group_by == group_by
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["algorithm"] == "cem" and manifest["stages"][0]["name"] == "matching"


def test_only_a_verified_manifest_has_an_identity(small_cfg: Config, tmp_path: Path) -> None:
    _, path = _saved(small_cfg, tmp_path)
    verified = read_artifact(path)
    assert verified.sha256 == _sha(path / "manifest.json") and verified.version == verified.sha256[:16]
    with pytest.raises(ArtifactError, match="not read by read_artifact has no verified identity"):
        peek_manifest(path).sha256  # noqa: B018 - the property raises


def test_tampered_weights_are_refused(small_cfg: Config, tmp_path: Path) -> None:
    _, path = _saved(small_cfg, tmp_path)
    torch.save({"weights": torch.zeros(1, sum(small_cfg.cascade.action_dims))}, path / "weights.pt")
    with pytest.raises(ArtifactError, match="sha256.*tampered"):
        load_policy(path, small_cfg)


def test_missing_file_is_refused(small_cfg: Config, tmp_path: Path) -> None:
    _, path = _saved(small_cfg, tmp_path)
    (path / "weights.pt").unlink()
    with pytest.raises(ArtifactError, match="weights.pt .*missing"):
        load_policy(path, small_cfg)


def test_artifact_for_another_cascade_is_refused(small_cfg: Config, tmp_path: Path) -> None:
    _, path = _saved(small_cfg, tmp_path)
    other = load_config(
        None,
        [
            "cascade.pool_size=100",
            "cascade.stages.0.keep=20",
            "cascade.stages.1.keep=8",
            "cascade.stages.2.keep=4",
            "cascade.stages.2.heads=[affinity, quality]",
        ],
    )
    with pytest.raises(ArtifactError, match="built for stages"):
        load_policy(path, other)


def test_not_an_artifact(small_cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a policy artifact"):
        load_policy(tmp_path, small_cfg)


def test_existing_artifact_is_not_overwritten(small_cfg: Config, tmp_path: Path) -> None:
    policy, path = _saved(small_cfg, tmp_path)
    with pytest.raises(FileExistsError):
        save_weight_policy(policy, path, small_cfg, algorithm="cem")
    assert load_policy(path, small_cfg) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"], "no temporary directory left behind"


def _relist(path: Path, listed: dict[str, str]) -> None:
    """Rewrite the manifest's file list, as someone who can write the artifact directory could."""
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(manifest | {"files": listed}))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["../outside.pt", "/etc/passwd", "sub/../../x", "a\\..\\b", "manifest.json"])
def test_a_listed_path_that_leaves_the_directory_is_refused(
    small_cfg: Config, tmp_path: Path, name: str
) -> None:
    _, path = _saved(small_cfg, tmp_path)
    _relist(path, {"weights.pt": _sha(path / "weights.pt"), name: "0" * 64})
    with pytest.raises(ArtifactError, match="a listed file must be a plain path inside the artifact"):
        load_policy(path, small_cfg)


def test_a_symlinked_file_is_refused_even_with_its_hash(small_cfg: Config, tmp_path: Path) -> None:
    _, path = _saved(small_cfg, tmp_path)
    outside = _saved(small_cfg, tmp_path / "elsewhere")[1] / "weights.pt"
    (path / "weights.pt").unlink()
    (path / "weights.pt").symlink_to(outside)
    _relist(path, {"weights.pt": _sha(outside)})
    with pytest.raises(ArtifactError, match="weights.pt is a symbolic link"):
        load_policy(path, small_cfg)


def test_a_symlinked_folder_is_refused(small_cfg: Config, tmp_path: Path) -> None:
    """A link to a folder outside, listed or not: a copy of the artifact that follows it would carry that folder."""
    _, path = _saved(small_cfg, tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "credentials").write_text("not the artifact's")
    (path / "extra").symlink_to(secret, target_is_directory=True)
    with pytest.raises(ArtifactError, match="extra is a symbolic link"):
        load_policy(path, small_cfg)


def test_unlisted_files_are_refused(small_cfg: Config, tmp_path: Path) -> None:
    _, path = _saved(small_cfg, tmp_path)
    (path / "sub").mkdir()
    (path / "sub" / "payload.pkl").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match=r"files \['sub/payload.pkl'\] are not in the manifest"):
        load_policy(path, small_cfg)


def test_weights_the_manifest_does_not_list_are_never_loaded(small_cfg: Config, tmp_path: Path) -> None:
    """A manifest that lists another file and hashes it, with the weights present but unlisted (or absent)."""
    _, path = _saved(small_cfg, tmp_path)
    (path / "notes.txt").write_text("harmless")
    _relist(path, {"notes.txt": _sha(path / "notes.txt")})
    with pytest.raises(ArtifactError, match=r"files \['weights.pt'\] are not in the manifest"):
        load_policy(path, small_cfg)
    (path / "weights.pt").unlink()
    with pytest.raises(
        ArtifactError, match="weights.pt is not listed in the manifest; nothing unlisted is loaded"
    ):
        load_policy(path, small_cfg)


def test_weights_outside_the_action_bounds_are_refused(small_cfg: Config, tmp_path: Path) -> None:
    """Hashes prove a file is the one written, not that it is sane: NaN or out-of-bounds weights (a diverged or
    hand-made artifact) would rank every page by NaN scores, so loading refuses them."""
    dims = sum(small_cfg.cascade.action_dims)
    for bad in (
        torch.full((1, dims), float("nan")),
        torch.full((1, dims), small_cfg.cascade.action_high + 1),
    ):
        _, path = _saved(small_cfg, tmp_path / str(bad[0, 0].item()))
        rehash(path, bad)
        with pytest.raises(ArtifactError, match="outside the cascade's action bounds"):
            load_policy(path, small_cfg)


def test_actors_with_non_finite_values_are_refused(
    small_cfg: Config, small_actors: Path, tmp_path: Path
) -> None:
    path = tmp_path / "actors"
    shutil.copytree(small_actors, path)
    state = load_file(path / ACTORS_FILE)
    name = min(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("inf"))
    save_file(state, path / ACTORS_FILE)
    listed = json.loads((path / "manifest.json").read_text())["files"]
    _relist(path, {**listed, ACTORS_FILE: _sha(path / ACTORS_FILE)})
    with pytest.raises(ArtifactError, match=f"non-finite values in {name}"):
        load_actor_policy(path, small_cfg)


@pytest.mark.parametrize("kind", ["weights", "actors"])
def test_a_file_replaced_after_verification_is_never_loaded(
    small_cfg: Config, small_actors: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The loaders parse the bytes they hash: a file swapped between the directory's verification and its load
    (here, right after verify_listed_files passed) is refused instead of loaded."""
    if kind == "weights":
        _, path = _saved(small_cfg, tmp_path)
        name, load = "weights.pt", load_policy
    else:
        path, name, load = tmp_path / "actors", ACTORS_FILE, load_actor_policy
        shutil.copytree(small_actors, path)
    original = (path / name).read_bytes()
    verify = artifact.verify_listed_files

    def verify_then_swap(directory: Path, listed: dict[str, str], what: str = "artifact") -> None:
        verify(directory, listed, what)
        (path / name).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))

    monkeypatch.setattr(artifact, "verify_listed_files", verify_then_swap)
    with pytest.raises(ArtifactError, match=f"{name}: sha256 .* refusing the tampered artifact"):
        load(path, small_cfg)
    monkeypatch.undo()
    (path / name).write_bytes(original)
    load(path, small_cfg)  # the file as verified loads
