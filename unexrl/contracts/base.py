"""One way to read and write a contract: JSON validated against its model, with a schema version, written
atomically, its sha256 returned so a reader downstream can pin exactly what it was given."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from unexrl.io import atomic_write_text

SHA256 = r"^[0-9a-f]{64}$"
"""a file's sha256 as lowercase hex"""


class ContractError(ValueError):
    """A contract file is missing, is not JSON, or breaks its model; the message names the file and the field."""


STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, ser_json_inf_nan="constants")
"""every contract's settings: unknown fields refused, no coercion, NaN written as NaN (not null), so a metric that
could not be computed reads back as the NaN the gate refuses, not as a missing number"""


class Part(BaseModel):
    """A piece of a contract: as strict as the contract, with no schema version of its own."""

    model_config = STRICT


class Contract(BaseModel):
    """A document one part writes and another reads. Unknown fields are refused (a typo is not silently dropped),
    types are strict (``"1"`` or ``true`` is not a number); ``schema_version`` says which model wrote it, and a
    reader refuses another version instead of guessing."""

    model_config = STRICT
    SCHEMA_VERSION: ClassVar[int] = 1

    schema_version: int = 1

    @model_validator(mode="after")
    def _known_version(self) -> Self:
        if self.schema_version != self.SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version}: this code reads version {self.SCHEMA_VERSION} "
                f"of {type(self).__name__}"
            )
        return self

    def write(self, path: Path) -> str:
        """Write the contract to ``path`` (temporary file, then one rename); returns the file's sha256."""
        text = self.model_dump_json(indent=2) + "\n"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), text)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def read(cls, path: Path) -> Self:
        """The contract at ``path``, validated; ContractError names the file and every field that is wrong."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ContractError(f"{path}: no {cls.__name__} here") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: bytes | str, where: str) -> Self:
        """A contract from its JSON text (e.g. read from object storage); errors name ``where`` and the fields."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}" for e in err.errors()
            )
            raise ContractError(f"{where}: not a valid {cls.__name__}: {problems}") from None
