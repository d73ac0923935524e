"""What one run of `unexrl experiment` leaves on disk for the summary and for a resumed experiment: a record beside
the ``.npz`` of its per-session outcomes, written after it, so that its presence marks a complete run."""

from __future__ import annotations

import json
from typing import Self

from pydantic import Field

from unexrl.contracts.base import Contract, ContractError
from unexrl.contracts.diagnostics import CriticDiagnostics
from unexrl.contracts.training import ValidationScore


class RunRecord(Contract):
    """One trained (or tuned) policy of the experiment and how it was scored (unexrl/experiment.py)."""

    variant: str
    seed: int = Field(ge=0)
    """the training seed k (seeds.train shifted by 100 k)"""
    agents: int | None
    """the agents-count study's number of learning stages; None in the main table"""
    curve: list[ValidationScore]
    """the learner's validation points; a baseline's one point at 0 updates (its plot's reference line)"""
    seconds: float = Field(ge=0)
    eval_seeds: int = Field(ge=1)
    """how many evaluation seeds the ``.npz`` holds outcomes for"""
    group_actions: list[list[float]]
    """[activity group][weight] mean action on the first evaluation seed's requests"""
    diagnostics: CriticDiagnostics | None
    """the final critic against the simulator's truth (learners of the main table only)"""

    @classmethod
    def parse(cls, data: bytes | str, where: str) -> Self:
        """The record from its JSON text; one written before this contract (:func:`_from_untyped`) is read too."""
        return super().parse(_from_untyped(data, where), where)


def _from_untyped(data: bytes | str, where: str) -> bytes | str:
    """A run record as `unexrl experiment` wrote it until 2026-12-07 (no schema version, ``n_eval_seeds``, each
    curve point with its training losses) as a RunRecord; any other document as it is, for validation to judge."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    if not (isinstance(doc, dict) and "schema_version" not in doc and "n_eval_seeds" in doc):
        return data
    try:
        curve = [
            {"updates": p["updates"], "validation_watch_time": p["validation_watch_time"]}
            for p in doc["curve"]
        ]
    except (KeyError, TypeError) as err:
        raise ContractError(f"{where}: an untyped run record whose curve cannot be read: {err!r}") from None
    upgraded = {k: v for k, v in doc.items() if k not in ("n_eval_seeds", "curve")}
    return json.dumps({**upgraded, "schema_version": 1, "eval_seeds": doc["n_eval_seeds"], "curve": curve})
