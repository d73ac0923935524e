"""Export for serving: the trained actors, whole (unsharded), as an ``actors`` artifact (unexrl/rl/actors.py).

    export/actors.safetensors   every actor's state, each sharded table assembled from its shards
    export/manifest.json        schema version, kind "actors", algorithm, config, stages (names, heads, sizes),
                                feature schema and table sizes, training data hashes, evaluation summary,
                                sha256 of every file

The export is published in one rename, and only after it has been loaded back through the serving loader
(hashes, compatibility) and has reproduced, on a fixed probe batch, the actions of the actors it was taken from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor

from unexrl.cascade import StageView, run_cascade
from unexrl.config import Config
from unexrl.contracts.actors import (
    ActorFeatures,
    ActorsManifest,
    FixedStages,
    OfflineData,
    OnlineData,
    SelectionRecord,
    TrainingRecord,
    ValidationRecord,
)
from unexrl.io import atomic_directory, sha256_file
from unexrl.rl.actors import ACTORS_FILE, feature_schema, load_actor_policy
from unexrl.rl.agent import learning_stages
from unexrl.sim.env import Policy, Simulator

if TYPE_CHECKING:
    from unexrl.train.loop import OfflineInputs

PROBE_SESSIONS = 16
PROBE_TOLERANCE = 1e-5
"""largest action difference allowed between the trained actors and their export on the probe batch"""


def probe_actions(policy: Policy, sim: Simulator) -> list[Tensor]:
    """Every stage's action on a fixed batch: the first request of sessions 0..15 of the first validation seed.

    The same observation must give the same actions however the actors are stored (sharded, exported, served).
    """
    obs = sim.observe(sim.start(sim.cfg.seeds.validation[0], torch.arange(PROBE_SESSIONS)))
    actions: list[Tensor] = []

    def act(view: StageView) -> Tensor:
        actions.append(policy.act(obs, view))
        return actions[-1]

    run_cascade(obs.predictions, sim.keep, act)
    return [a.detach().cpu() for a in actions]


def training_data(cfg: Config, logs: Path | None, offline: OfflineInputs | None) -> OnlineData | OfflineData:
    """What the actors were trained on: the simulator seeds (online), or the logs as the manifest validated with
    their tables described them (offline), with the verified point-in-time training set that accompanied them
    (unexrl.features.training_set.verify_training_set)."""
    if logs is None or offline is None:
        return OnlineData(regime="online", seeds=list(cfg.seeds.train), world_seed=cfg.seeds.world)
    return OfflineData(
        regime="offline",
        logs=str(logs),
        seeds=list(offline.manifest.seeds),
        sha256={name: entry.sha256 for name, entry in offline.manifest.files.items()},
        training_set=offline.training_set,
    )


def export_actors(
    state: dict[str, Tensor],
    out_dir: Path,
    cfg: Config,
    sim: Simulator,
    expected: list[Tensor],
    *,
    training_data: OnlineData | OfflineData,
    fixed_stages: FixedStages,
    training: TrainingRecord,
    evaluation: ValidationRecord,
    selection: SelectionRecord,
) -> Path:
    """Write the actors' whole ``state`` as an artifact in ``out_dir`` (replacing it), verified against ``expected``
    (the trained actors' :func:`probe_actions`); the keyword sections describe the run that made them."""
    with atomic_directory(out_dir, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / ACTORS_FILE)
        tables = {
            k.split(".")[-2]: (v.shape[0], v.shape[1]) for k, v in state.items() if ".embedding_bags." in k
        }
        ActorsManifest.for_config(
            cfg,
            algorithm=cfg.algo.name,
            files={ACTORS_FILE: sha256_file(tmp / ACTORS_FILE)},
            data_seeds=[*training_data.seeds, *(fixed_stages.seen_seeds or [])],
            learning_stages=learning_stages(cfg),
            features=ActorFeatures(**dict(feature_schema(cfg)), tables=tables),
            training_data=training_data,
            fixed_stages=fixed_stages,
            training=training,
            evaluation=evaluation,
            selection=selection,
        ).publish(tmp)
        served = probe_actions(load_actor_policy(tmp, cfg, sim.world), sim)
        worst = max(float((a - b).abs().max()) for a, b in zip(served, expected))
        if worst > PROBE_TOLERANCE:
            raise RuntimeError(
                f"the export's actions differ from the trained actors' by {worst:.3g} on the probe "
                f"batch (tolerance {PROBE_TOLERANCE}); not publishing {out_dir}"
            )
    return Path(out_dir)
