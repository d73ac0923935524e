"""The ``actors`` artifact's manifest (unexrl/train/export.py writes it, unexrl/rl/actors.py loads it): the common
manifest, what the actors' inputs mean, and where the run that made them got its data, weights and curve.

Version 2 records the whole input contract (history window, user-feature window and scale) and types every
section. A version-1 manifest is read as version 2: what it lacks is in the full training config it records, so an
incumbent exported before the change is still evaluated and served, and refused where those inputs differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError, ArtifactManifest
from unexrl.contracts.base import SHA256, STRICT, ContractError, Part
from unexrl.contracts.training import CurvePoint


class IdSpace(Part):
    """The world the tables' rows index: row i of a table means the same entity only in the same world."""

    world_seed: int
    users: int = Field(gt=0)
    items: int = Field(gt=0)
    categories: int = Field(gt=0)


class UserFeatureInputs(Part):
    """The user feature row the actors read (``algo.user_features``) and the settings that scale its columns."""

    columns: list[str]
    """unexrl.user_features.COLUMNS, in the actors' input order"""
    recent_items: int = Field(ge=1)
    """``features.recent_items``: how many viewed items the recent watch fraction averages"""
    duration_median_s: float = Field(gt=0)
    """``world.duration_median_s``: the cold-start default of the mean viewed duration and its scale"""


class FeatureSchema(Part):
    """What the actors' inputs mean; serving refuses actors whose schema differs from its config's."""

    sparse: list[str]
    """the sparse features, in the encoder's order"""
    state: list[str]
    """the session-state columns, in the dense input's order"""
    history_window: int = Field(ge=1)
    """``session.history_window``: how many recently viewed items the history features pool"""
    activity_groups: int = Field(ge=1)
    max_requests: int = Field(ge=1)
    """``session.max_requests``: the scale of the step feature"""
    user_features: UserFeatureInputs | None
    """None: the actors read no user feature row"""
    id_space: IdSpace


class ActorFeatures(FeatureSchema):
    """The feature schema the actors were trained with, and their tables' shapes."""

    tables: dict[str, tuple[int, int]]
    """table name: (rows, embedding dim)"""


class TrainingSetRecord(Part):
    """The point-in-time training set the run was checked against (unexrl.features.training_set)."""

    file: str
    sha256: str = Field(pattern=SHA256)
    rows: int = Field(ge=0)
    feature_service: str


class OnlineData(Part):
    """Trained in the simulator, on these seeds of this world."""

    regime: Literal["online"]
    seeds: list[int]
    world_seed: int


class OfflineData(Part):
    """Trained on logs: the log manifest's seeds and file hashes as the run read them at its start."""

    regime: Literal["offline"]
    logs: str
    seeds: list[int]
    sha256: dict[str, Annotated[str, Field(pattern=SHA256)]]
    """log file: sha256"""
    training_set: TrainingSetRecord | None = None


class FixedStages(Part):
    """Where the CEM weights of the stages that do not learn (and the actors' starting point) came from."""

    source: Literal["artifact", "tuned"]
    seen_seeds: list[int] | None
    """the seeds whose sessions made these weights: ``tuned``, the training seeds CEM was tuned on here;
    ``artifact``, the CEM artifact's own ``seen_seeds``; None: not recorded (a version-1 manifest written before
    they were; its common ``seen_seeds`` has them)"""
    path: str | None = None
    """``artifact``: the CEM artifact's path"""
    sha256: dict[str, str] | None = None
    """``artifact``: its files' hashes"""


class TrainingRecord(Part):
    """How the run trained: its updates, where it resumed, and how its tables were placed."""

    updates: int = Field(ge=0)
    resumed_from: int | None
    world_size: int = Field(ge=1)
    sharding: dict[str, str]
    """distributed runs: table -> sharding type and ranks"""


class ValidationRecord(Part):
    """The run's validation curve: on which seed and how many sessions, and every point."""

    validation_seed: int
    sessions: int = Field(ge=1)
    final_validation_watch_time: float | None
    curve: list[CurvePoint]


class SelectionRecord(Part):
    """Which validation point's actors were exported (``train.select``)."""

    rule: Literal["best_validation", "final"]
    """``train.select``"""
    updates: int | None
    """None: the final actors"""
    validation_watch_time: float | None


class ActorsManifest(ArtifactManifest):
    """Trained actors: what their inputs mean, which stages learned, and what the run that made them did."""

    model_config = STRICT
    KIND: ClassVar[str | None] = "actors"
    SCHEMA_VERSION: ClassVar[int] = 2

    kind: Literal["actors"]
    schema_version: int = 2
    learning_stages: list[int]
    features: ActorFeatures
    training_data: Annotated[OnlineData | OfflineData, Field(discriminator="regime")]
    fixed_stages: FixedStages
    training: TrainingRecord
    evaluation: ValidationRecord
    selection: SelectionRecord

    @classmethod
    def parse(cls, data: bytes | str, where: str) -> Self:
        """The manifest from its JSON text; a version-1 document is first rewritten as version 2
        (:func:`_from_version_1`), then validated like any other."""
        return super().parse(_from_version_1(data, where), where)

    def check_features(self, ours: FeatureSchema, where: Path) -> None:
        """Refuse actors whose inputs would mean something else where ``ours`` is the schema (features, scaling,
        id space)."""
        differ = {
            name: (getattr(self.features, name), getattr(ours, name))
            for name in FeatureSchema.model_fields
            if getattr(self.features, name) != getattr(ours, name)
        }
        if differ:
            raise ArtifactError(f"{where}: feature schema differs (artifact, config): {differ}")


def _from_version_1(data: bytes | str, where: str) -> bytes | str:
    """A version-1 actors manifest as version 2; any other document as it is. Version 1 differs in two sections:
    ``features`` lacked the history window and listed the user feature columns alone, ``fixed_stages`` called a
    tuned run's seeds ``seeds``; what is missing is read from the training config the manifest records."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data  # validation names what is wrong with it
    if not (isinstance(doc, dict) and doc.get("schema_version") == 1 and doc.get("kind") == "actors"):
        return data
    try:
        cfg = Config.model_validate_json(json.dumps(doc["config"]))
        features, fixed = dict(doc["features"]), dict(doc["fixed_stages"])
    except (KeyError, TypeError, ValueError) as err:
        raise ContractError(
            f"{where}: a version-1 actors manifest that cannot be read as version 2 (its config, features and "
            f"fixed_stages are needed): {type(err).__name__}: {err}"
        ) from None
    columns = features.get("user_features") or []
    features["history_window"] = cfg.session.history_window
    features["user_features"] = (
        {
            "columns": columns,
            "recent_items": cfg.features.recent_items,
            "duration_median_s": cfg.world.duration_median_s,
        }
        if columns
        else None
    )
    fixed["seen_seeds"] = fixed.pop("seeds", fixed.get("seen_seeds"))
    return json.dumps(doc | {"schema_version": 2, "features": features, "fixed_stages": fixed})
