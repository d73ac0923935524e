"""`unexrl train`: one training run in a run directory, in one process or on every rank under torchrun.

    <out>/checkpoints/               DCP checkpoints, the last two (unexrl/train/checkpoint.py)
    <out>/export/                    the actors train.select picks (default: the best validation point), for
                                     serving (unexrl/train/export.py)
    <out>/config.json                the resolved config the run trains with (rank 0, first)
    <out>/curve.json                 the validation curve and a summary of the run (rank 0)
    <out>/probe_actions.safetensors  the final actors' actions on the probe batch, as the sharded model gave them

A run is complete when export/manifest.json verifies and curve.json says ``updates == train.updates``; judge by
that rather than by the exit code alone (a rare abort at interpreter exit after distributed training is known).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor

from unexrl.config import Config
from unexrl.contracts import files
from unexrl.contracts.actors import (
    FixedStages,
    SelectionRecord,
    TrainingRecord,
    ValidationRecord,
)
from unexrl.contracts.artifact import ArtifactError
from unexrl.contracts.logs import LogManifest
from unexrl.contracts.training import TrainingSummary
from unexrl.features.training_set import precheck_training_set
from unexrl.io import atomic_write_bytes, atomic_write_text
from unexrl.policies.artifact import load_weights_artifact
from unexrl.policies.cem import tune_cem
from unexrl.rl.policy import ActorPolicy
from unexrl.sim.env import Simulator
from unexrl.train.diagnose import RUN_CONFIG, check_run_config
from unexrl.train.distributed import Context, barrier, broadcast, destroy, full_state_dict, init
from unexrl.train.export import export_actors, probe_actions, training_data
from unexrl.train.loop import train

log = logging.getLogger(__name__)

EXPORT = "export"
PROBE = "probe_actions.safetensors"


def run_training(
    cfg: Config,
    out: Path,
    logs: Path | None = None,
    cem: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    training_set: Path | None = None,
) -> Path:
    """Train ``cfg.algo`` into ``out`` and export the actors; returns the export directory.

    Under torchrun every rank calls this; it joins and leaves the process group itself. ``training_set``: the
    point-in-time training set of ``logs``; training checks it against them and the export records its sha256.
    """
    if training_set is not None and logs is None:
        raise ValueError("a training set accompanies logs: give --logs with --training-set")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
    ctx = init(cfg.device)
    try:
        return _run(cfg, Path(out), logs, cem, resume, progress, ctx, training_set)
    finally:
        destroy(ctx)


def _run(
    cfg: Config,
    out: Path,
    logs: Path | None,
    cem: Path | None,
    resume: bool,
    progress: bool,
    ctx: Context,
    training_set: Path | None = None,
) -> Path:
    if not resume and any((out / "checkpoints").glob("step-*")):
        raise FileExistsError(
            f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
            "or choose another --out"
        )
    if resume and (out / RUN_CONFIG).is_file():
        # the checkpoints hold networks, knots and replay positions of that config: another would misread them
        check_run_config(cfg, out)
    if ctx.is_main:  # what `unexrl diagnose` and a reader of the run need to know it was trained with
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / RUN_CONFIG, json.dumps(cfg.to_dict(), indent=1))
    if logs is not None:  # fail before CEM tuning and sharding; training reads and checks the data itself
        manifest = LogManifest.read(Path(logs) / files.MANIFEST)
        cfg.seeds.check_unseen(manifest.seeds, f"the logs {logs}")
        if training_set is not None:
            transitions = manifest.files[files.TRANSITIONS].rows
            precheck_training_set(Path(training_set), transitions, cfg.cascade.page_size)
    sim = Simulator(cfg)
    weights, fixed_stages = _fixed_stage_weights(cfg, sim, cem, ctx)
    started = time.perf_counter()
    result = train(
        cfg, weights, sim, logs, progress, ctx=ctx, run_dir=out, resume=resume, training_set=training_set
    )
    seconds = time.perf_counter() - started
    if resume and result.resumed_from is None:
        log.warning("--resume: no checkpoint under %s, trained from the start", out / "checkpoints")

    # both collectives: the sharded actors act on the probe batch, and their tables are assembled whole
    final_actions = probe_actions(ActorPolicy(result.agent.actors, cfg, sim.world), sim)
    state = full_state_dict(result.agent.actors, ctx.device)
    if ctx.is_main:
        selected, selected_updates = result.selected(cfg.train.select)
        expected = final_actions
        if selected is not None:  # rank 0's unsharded copy of the best validation point
            state = selected.state_dict()
            expected = probe_actions(ActorPolicy(selected, cfg, sim.world), sim)
        final = result.curve[-1].validation_watch_time if result.curve else None
        summary = TrainingSummary(
            algorithm=cfg.algo.name,
            regime=cfg.train.regime,
            updates=result.agent.updates,
            resumed_from=result.resumed_from,
            world_size=ctx.world_size,
            seconds=round(seconds, 2),
            **_throughput(result.agent.updates - (result.resumed_from or 0), result.seconds, seconds),
            final_validation_watch_time=final,
            selected_updates=selected_updates,
            curve=result.curve,
        )
        training = TrainingRecord(
            updates=result.agent.updates,
            resumed_from=result.resumed_from,
            world_size=ctx.world_size,
            sharding=result.sharding,
        )
        evaluation = ValidationRecord(
            validation_seed=cfg.seeds.validation[0],
            sessions=cfg.train.eval_sessions,
            final_validation_watch_time=final,
            curve=result.curve,
        )
        selection = SelectionRecord(
            rule=cfg.train.select,
            updates=selected_updates,
            validation_watch_time=result.best_score if selected is not None else final,
        )
        atomic_write_bytes(
            out / PROBE, save({f"stage{i}": a.contiguous() for i, a in enumerate(final_actions)})
        )
        export_actors(
            state,
            out / EXPORT,
            cfg,
            sim,
            expected,
            training_data=training_data(cfg, logs, result.offline),
            fixed_stages=fixed_stages,
            training=training,
            evaluation=evaluation,
            selection=selection,
        )
        summary.write(out / files.CURVE)  # last and whole: it marks a finished run
        log.info(
            "train done algo=%s updates=%d seconds=%.1f final_validation_watch_time=%s export=%s",
            cfg.algo.name,
            result.agent.updates,
            seconds,
            final,
            out / EXPORT,
        )
    barrier(ctx)
    return out / EXPORT


def _throughput(updates: int, parts: dict[str, float], total: float) -> dict[str, Any]:
    """Updates per second inside the update step and over the whole run, and where the rest of the time went."""
    inside = parts.get("update", 0.0)
    return {
        "updates_per_s": round(updates / inside, 2) if inside else None,
        "run_updates_per_s": round(updates / total, 2) if total else None,
        "seconds_by_part": {k: round(v, 2) for k, v in sorted(parts.items())},
        "seconds_per_update_outside_update": round((total - inside) / updates, 5) if updates else None,
    }


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Keep TorchRec's and FBGEMM's INFO lines (several per table and per sharded forward) out of the run's log."""
    return record.levelno >= logging.WARNING or not any(
        lib in record.pathname for lib in ("/torchrec/", "/fbgemm_gpu/")
    )


def _fixed_stage_weights(
    cfg: Config, sim: Simulator, cem: Path | None, ctx: Context
) -> tuple[Tensor, FixedStages]:
    """CEM weights for the stages that do not learn and for the warm-up, and where they came from.

    Without an artifact rank 0 tunes them on seeds.train and every rank receives its result.
    """
    if cem is not None:
        policy, manifest = load_weights_artifact(cem, cfg)
        if policy.group_by != "none":
            raise ArtifactError(
                f"{cem}: a CEM artifact per {policy.group_by}; --cem needs global weights (group_by none)"
            )
        # its weights become the fixed stages and the actors' starting point: what it saw, they saw. It was tuned
        # on its config's seeds.train; its seen_seeds add that config's validation seeds whether it selected on
        # them or not, so against those only evaluation is checked
        cfg.seeds.check_unseen(manifest.trained_config().seeds.train, f"the CEM artifact {cem}")
        cfg.seeds.check_unseen(manifest.seen_seeds, f"the CEM artifact {cem}", ("evaluation",))
        return policy.weights.cpu(), FixedStages(
            source="artifact", seen_seeds=manifest.seen_seeds, path=str(cem), sha256=manifest.files
        )
    weights = torch.zeros(1, sum(cfg.cascade.action_dims))
    if ctx.is_main:
        log.info("no --cem given: tuning CEM on seeds.train %s first", list(cfg.seeds.train))
        weights = tune_cem(sim, cfg.cem, cfg.seeds.train).weights.cpu().float()
    return broadcast(weights, ctx), FixedStages(source="tuned", seen_seeds=list(cfg.seeds.train))
