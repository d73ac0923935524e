"""The manifests of the data the pipeline moves: a log directory (unexrl/data) and the feature tables built from
it (unexrl/features/build.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, model_validator

from unexrl.contracts import files
from unexrl.contracts.base import SHA256, Contract, Part


class TableEntry(Part):
    rows: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256)


class LogManifest(Contract):
    """A log directory: what produced it (config, seeds, behaviour policy) and each table's rows and sha256."""

    created_at: datetime
    config: dict[str, Any]
    """the config the logs were written under (unexrl.config.Config)"""
    seeds: list[int] = Field(min_length=1)
    """the simulator seeds the sessions came from: never evaluate on these"""
    behaviour: dict[str, Any]
    """the logging policy: kind, exploration, where its weights came from"""
    files: dict[str, TableEntry]

    @model_validator(mode="after")
    def _every_table(self) -> LogManifest:
        if set(self.files) != set(files.LOG_TABLES):
            raise ValueError(f"files: {sorted(self.files)}, expected exactly {list(files.LOG_TABLES)}")
        return self


class FeatureTable(Part):
    file: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet$")
    rows: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256)
    min_timestamp: datetime | None
    max_timestamp: datetime | None


class FeatureManifest(Contract):
    """Feature tables computed from one log directory, each stamped with when its information was known."""

    created_at: datetime
    logs: str
    """the log directory or URI the tables were computed from"""
    logs_manifest_sha256: str = Field(pattern=SHA256)
    config: dict[str, Any]
    tables: dict[str, FeatureTable]
