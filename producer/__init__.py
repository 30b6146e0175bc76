"""deltaflush producer: append Arrow batches to per-table Redis Streams.

>>> from producer import Producer
>>> p = Producer()
>>> p.append("events", [{"id": 1, "kind": "click"}])
>>> p.flush("events")
>>> p.read("events").read_all()   # both tiers, one consistent snapshot
"""

from .aio import AsyncProducer
from .client import Producer
from .errors import (
    ClaimMismatch,
    ConfigError,
    DeltaflushError,
    FlushError,
    InvalidInput,
    InvalidTableName,
    LeaseLost,
    NotYetVisible,
    ReadError,
    ReplicationTimeout,
    SchemaConflict,
    SchemaRace,
    UnsupportedData,
    UpgradeRequired,
)
from .settings import Settings
from .tablecfg import TableConfig

__all__ = [
    "AsyncProducer",
    "ClaimMismatch",
    "ConfigError",
    "DeltaflushError",
    "FlushError",
    "InvalidInput",
    "InvalidTableName",
    "LeaseLost",
    "NotYetVisible",
    "Producer",
    "ReadError",
    "ReplicationTimeout",
    "SchemaConflict",
    "SchemaRace",
    "Settings",
    "TableConfig",
    "UnsupportedData",
    "UpgradeRequired",
]
