"""Checkpoints of a training run with torch.distributed.checkpoint (DCP), written atomically; the last KEEP stay.

    checkpoints/step-00000040/  .metadata, __<rank>_0.distcp   DCP: online and target networks (tables as shards),
                                                                dense Adam and fused Adagrad states, CQR knots
                                rng-rank<r>.pt                   each rank's torch RNG and sampling-generator states
                                best-actors.safetensors          rank 0: the actors of the best validation point
                                progress.json                    update count, next session, curve, world size,
                                                                 the best point's update count and score
                                manifest.json                    every file above and its sha256
                                manifest.sig                     its signature, where the trainer holds the key

Every rank writes into ``.step-<n>.tmp``; when all are done rank 0 adds progress.json and the hash manifest, and
renames the directory, so a directory named ``step-*`` is complete and a killed run leaves at most a temporary one
behind. Restoring verifies the manifest (and, where the trainer holds a signing key, its signature with that
key) before DCP opens anything: ``.metadata`` is unpickled, so whoever could write the run volume could
otherwise run code in training. Every file is then parsed from the very bytes its hash is checked on (DCP's
through :class:`VerifiedReader`), so a file replaced after the check is refused, not unpickled.

The replay buffer is not saved (it can be gigabytes per rank). On resume it is refilled: offline from the same
logs, which gives back exactly what it held; online by a re-warm-up of ``train.warmup_sessions`` fresh sessions
under the restored actors with exploration. The CQR knots are restored, so the reward scale does not move.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.optim.keyed import KeyedOptimizer

from unexrl.contracts import files
from unexrl.contracts.artifact import ArtifactError, read_verified, verify_listed_files
from unexrl.contracts.base import ContractError
from unexrl.contracts.signing import sign_manifest, signer_keys, verify_manifest
from unexrl.contracts.training import CheckpointManifest, TrainingProgress
from unexrl.io import sha256_file
from unexrl.rl.agent import CascadeAgent
from unexrl.train.distributed import Context, barrier

log = logging.getLogger(__name__)

KEEP = 2
"""complete checkpoints kept; older ones are removed after each save"""
PROGRESS = "progress.json"
BEST_ACTORS = "best-actors.safetensors"


def resumed_session_index(next_session: int, saved_world_size: int, world_size: int) -> int:
    """The first local session index of a run resumed at another world size. Session ids are index * world_size +
    rank, so the saved ranks used every id below next_session * saved_world_size: start past all of them."""
    return -(-next_session * saved_world_size // world_size)


def _state(agent: CascadeAgent, fused: KeyedOptimizer | None, knots: Tensor | None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "model": agent.state_dict(),
        "actor_optimizer": agent.actor_optimizer.state_dict(),
        "critic_optimizer": agent.critic_optimizer.state_dict(),
    }
    if fused is not None:
        state["fused_optimizer"] = fused.state_dict()
    if knots is not None:
        state["cqr_knots"] = knots
    return state


def _check_same_table_training(path: Path, saved: set[str], sharded: bool, in_process: bool) -> None:
    """Refuse a checkpoint whose tables were trained the other way: sharded tables keep fbgemm's fused optimizer
    state (``fused_optimizer``), one process's keep RowWiseAdagrad's; resuming across would fail on the missing
    keys, or silently restart the row-wise accumulators."""
    fused_saved = any(key.startswith("fused_optimizer") for key in saved)
    if (sharded and not fused_saved) or (in_process and fused_saved):
        saved_by, resumed_by = ("one process", "torchrun") if sharded else ("torchrun", "one process")
        raise RuntimeError(
            f"{path}: a checkpoint of a run whose tables trained in {saved_by} cannot resume under {resumed_by} "
            "(the tables' optimizer state is kept differently); resume it the way it was trained"
        )


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "sampling": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class Checkpoints:
    """The checkpoints directory of one run."""

    def __init__(self, root: Path, ctx: Context, read_only: bool = False) -> None:
        """``read_only``: only restore (`unexrl diagnose`), never touch the directory of a run that may be going on."""
        self.root, self.ctx = Path(root), ctx
        if ctx.is_main and not read_only:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".step-*.tmp"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint."""
        done = sorted(p for p in self.root.glob("step-*") if (p / PROGRESS).is_file())
        return done[-1] if done else None

    def save(
        self,
        agent: CascadeAgent,
        fused: KeyedOptimizer | None,
        knots: Tensor | None,
        progress: TrainingProgress,
        generator: torch.Generator,
        best_actors: nn.Module | None = None,
    ) -> Path:
        """Write a checkpoint (a collective: every rank calls it at the same update). ``best_actors``: rank 0's
        copy of the actors at ``progress.best_updates``, so that a resume selects among every point."""
        started = time.perf_counter()
        name = f"step-{progress.updates:08d}"
        tmp, final = self.root / f".{name}.tmp", self.root / name
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.ctx)
        dcp.save(_state(agent, fused, knots), checkpoint_id=tmp, no_dist=not self.ctx.distributed)
        torch.save(_rng_state(generator, self.ctx.device), tmp / f"rng-rank{self.ctx.rank}.pt")
        barrier(self.ctx)
        if self.ctx.is_main:
            if best_actors is not None:
                save_file({k: v.contiguous() for k, v in best_actors.state_dict().items()}, tmp / BEST_ACTORS)
            progress.write(tmp / PROGRESS)
            listed = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            CheckpointManifest(updates=progress.updates, files=listed).write(tmp / files.MANIFEST)
            sign_manifest(tmp)
            if final.exists():  # the same update saved again (a resumed run that had finished)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in sorted(p for p in self.root.glob("step-*") if (p / PROGRESS).is_file())[:-KEEP]:
                shutil.rmtree(old)
            log.info(
                "checkpoint saved updates=%d path=%s seconds=%.2f",
                progress.updates,
                final,
                time.perf_counter() - started,
            )
        barrier(self.ctx)
        return final

    def restore(
        self,
        agent: CascadeAgent,
        fused: KeyedOptimizer | None,
        knots: Tensor | None,
        generator: torch.Generator,
        best_actors: nn.Module | None = None,
    ) -> TrainingProgress | None:
        """Load the newest complete checkpoint into ``agent``, ``fused``, ``knots`` (in place) and ``generator``,
        and its best validation point's actors into ``best_actors`` (rank 0, when it has them).

        Returns its progress, or None when there is none. Every rank calls it. A checkpoint from another world
        size loads too (DCP reshards); then ranks without a saved RNG state are reseeded from the update count.
        """
        path = self.latest()
        if path is None:
            return None
        listed = verify_checkpoint(path).files
        saved = set(VerifiedReader(path, listed).read_metadata().state_dict_metadata)
        _check_same_table_training(path, saved, fused is not None, agent.embedding_lr is not None)
        sparse = {id(m.weight) for m in agent.modules() if isinstance(m, nn.EmbeddingBag) and m.sparse}
        for key, optimizer in (
            ("actor_optimizer", agent.actor_optimizer),
            ("critic_optimizer", agent.critic_optimizer),
        ):
            _create_saved_state(optimizer, key, saved, sparse)
        state = _state(agent, fused, knots)
        try:  # in place: every tensor above is the live one
            dcp.load(state, storage_reader=VerifiedReader(path, listed), no_dist=not self.ctx.distributed)
        except (
            CheckpointException
        ) as err:  # DCP wraps a rank's refusal: say what was refused, not DCP's frames
            refused = [exc for exc, _ in err.failures.values() if isinstance(exc, ArtifactError)]
            if refused:
                raise refused[0] from None
            raise
        for key, optimizer in (
            ("actor_optimizer", agent.actor_optimizer),
            ("critic_optimizer", agent.critic_optimizer),
        ):
            optimizer.load_state_dict(state[key])
        # every file is parsed from the bytes its hash was checked on, DCP's through VerifiedReader
        progress = TrainingProgress.parse(
            read_verified(path, listed, PROGRESS, "checkpoint"), str(path / PROGRESS)
        )
        agent.updates = progress.updates
        if best_actors is not None and progress.best_updates is not None:
            best_actors.load_state_dict(load(read_verified(path, listed, BEST_ACTORS, "checkpoint")))
        rng_file = f"rng-rank{self.ctx.rank}.pt"
        if progress.world_size == self.ctx.world_size and rng_file in listed:
            rng = torch.load(
                io.BytesIO(read_verified(path, listed, rng_file, "checkpoint")), weights_only=True
            )
            torch.set_rng_state(rng["torch"])
            generator.set_state(rng["sampling"])
            if "cuda" in rng and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)
        else:
            log.warning(
                "checkpoint %s is from world size %d, this run has %d: RNG streams reseeded",
                path,
                progress.world_size,
                self.ctx.world_size,
            )
            torch.manual_seed(progress.updates * 1000 + self.ctx.rank)
            generator.manual_seed(progress.updates * 1000 + self.ctx.rank)
            progress = progress.model_copy(
                update={
                    "next_session": resumed_session_index(
                        progress.next_session, progress.world_size, self.ctx.world_size
                    )
                }
            )
        log.info("resumed from %s updates=%d", path, progress.updates)
        return progress


class VerifiedReader(dcp.FileSystemReader):
    """DCP's file-system reader, each file served from bytes read once and hashed against the checkpoint's
    manifest (``read_verified``): the pickled ``.metadata`` and the shards DCP unpickles are the bytes that were
    verified, not a second read of a file that may have been replaced since."""

    def __init__(self, path: Path, listed: dict[str, str]) -> None:
        super().__init__(path)
        self.fs = _VerifiedFiles(self.fs, Path(self.path), listed)


class _VerifiedFiles:
    """DCP's ``FileSystem`` (``create_stream`` is how FileSystemReader opens a file), reading verified bytes."""

    def __init__(self, fs: Any, root: Path, listed: dict[str, str]) -> None:
        self._fs, self._root, self._listed = fs, root, listed

    def create_stream(self, path: str | Path, mode: str) -> contextlib.AbstractContextManager[io.BytesIO]:
        if mode != "rb":
            raise ValueError(f"a checkpoint is read, not written, through VerifiedReader (mode {mode!r})")
        name = Path(path).relative_to(self._root).as_posix()
        return contextlib.nullcontext(io.BytesIO(read_verified(self._root, self._listed, name, "checkpoint")))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def verify_checkpoint(path: Path) -> CheckpointManifest:
    """Refuse a checkpoint whose files are not exactly those its manifest lists with their hashes, or (where this
    trainer holds a signing key) whose manifest is not signed with it; nothing of it has been opened before."""
    manifest_file = path / files.MANIFEST
    if not manifest_file.is_file():
        raise ArtifactError(f"{path}: no {files.MANIFEST}; refusing a checkpoint whose files are not hashed")
    data = manifest_file.read_bytes()
    try:
        verify_manifest(path, data, signer_keys())
        manifest = CheckpointManifest.parse(data, str(manifest_file))
    except ContractError as err:
        raise ArtifactError(str(err)) from None
    verify_listed_files(path, manifest.files, what="checkpoint")
    return manifest


def _create_saved_state(optimizer: KeyedOptimizer, key: str, saved: set[str], sparse: set[int]) -> None:
    """Create the lazy optimizer state of exactly the parameters that have one in the checkpoint, so it loads in
    place.

    One zero-gradient step creates it and moves nothing (sparse and empty for the tables that train on sparse
    gradients: ``sparse``, their ids); parameters without saved state keep none.
    """
    for name, param in optimizer.params.items():
        has_state = any(k.startswith(f"{key}.state.{name}.") for k in saved)
        zero = torch.zeros_like(param)
        param.grad = (zero.to_sparse(1) if id(param) in sparse else zero) if has_state else None  # type: ignore[assignment]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
