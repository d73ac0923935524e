"""The logged-data contract: Parquet tables written from simulator steps, read back with validation."""

from unexrl.data.reader import LoggedData, LogValidationError, cascade_inputs, read_logs
from unexrl.data.schema import SCHEMA_VERSION, items_schema, transitions_schema, users_schema
from unexrl.data.writer import LogWriter

__all__ = [
    "SCHEMA_VERSION",
    "LogValidationError",
    "LogWriter",
    "LoggedData",
    "cascade_inputs",
    "items_schema",
    "read_logs",
    "transitions_schema",
    "users_schema",
]
