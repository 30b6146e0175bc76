"""One frozen settings object per process, built from the environment at the entry point.

Library code never reads the environment at import time: the entry points (the Celery app,
the CLI, ``Producer()``) call :meth:`Settings.from_env`, and constructor arguments override
what the environment says.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError
from .tablecfg import FORMATS

_ENV = {
    "redis_url": "DELTAFLUSH_REDIS_URL",
    "broker_url": "DELTAFLUSH_BROKER_URL",
    "storage_uri": "DELTAFLUSH_STORAGE_URI",
    "flush_interval_s": "DELTAFLUSH_FLUSH_INTERVAL_S",
    "max_file_bytes": "DELTAFLUSH_MAX_FILE_BYTES",
    "lease_s": "DELTAFLUSH_LEASE_S",
    "key_prefix": "DELTAFLUSH_KEY_PREFIX",
    "task_time_limit_s": "DELTAFLUSH_TASK_TIME_LIMIT_S",
    "max_batch_bytes": "DELTAFLUSH_MAX_BATCH_BYTES",
    "max_pending_bytes": "DELTAFLUSH_MAX_PENDING_BYTES",
    "flush_at_bytes": "DELTAFLUSH_FLUSH_AT_BYTES",
    "allow_volatile_redis": "DELTAFLUSH_ALLOW_VOLATILE_REDIS",
    "table_format": "DELTAFLUSH_TABLE_FORMAT",
    "catalog_uri": "DELTAFLUSH_CATALOG_URI",
    "catalog_namespace": "DELTAFLUSH_CATALOG_NAMESPACE",
    "append_replicas": "DELTAFLUSH_APPEND_REPLICAS",
    "append_replicas_timeout_ms": "DELTAFLUSH_APPEND_REPLICAS_TIMEOUT_MS",
}


@dataclass(frozen=True)
class Settings:
    """Every knob of deltaflush, with units in the names.

    ``broker_url`` defaults to ``redis_url`` when left empty.
    """

    redis_url: str = "redis://localhost:6379/0"
    broker_url: str = ""
    storage_uri: str = "./data"
    flush_interval_s: float = 10.0
    max_file_bytes: int = 128 * 1024 * 1024
    lease_s: float = 30.0
    key_prefix: str = "deltaflush"
    # Hard time limit of one flush_table task. A flush stops taking new claims well before it
    # (see workers.flusher), so the limit only ever ends a flush that is stuck.
    task_time_limit_s: float = 600.0
    # Largest Arrow IPC payload one append may write.
    max_batch_bytes: int = 64 * 1024 * 1024
    # Appends to a table are refused (Backpressure) while this many bytes are pending;
    # 0 turns backpressure off.
    max_pending_bytes: int = 1024 * 1024 * 1024
    # A producer queues a flush at once when a table's pending bytes pass this (0: the
    # file size target), rather than waiting for the next scheduled flush.
    flush_at_bytes: int = 0
    # Workers stop at start on a Redis that may evict data; True accepts it (a demo, a
    # throwaway setup). See workers.doctor.
    allow_volatile_redis: bool = False
    # Format of tables that have no configuration yet: parquet, iceberg or delta.
    table_format: str = "parquet"
    # The Iceberg catalog: sqlite:////abs/path.db, postgresql+psycopg2://..., http(s)://
    # (REST). Empty: a SQLite catalog in the storage root (a local folder only).
    catalog_uri: str = ""
    # Iceberg namespace of deltaflush's tables.
    catalog_namespace: str = "deltaflush"
    # Replicas of a table's Redis master that must hold a batch before `append` returns
    # (Redis WAIT), and that a flusher waits for before it publishes (docs/cluster.md).
    append_replicas: int = 0
    # How long `append` (and a flusher) waits for them before ReplicationTimeout.
    append_replicas_timeout_ms: int = 2000

    def __post_init__(self) -> None:
        if self.table_format not in FORMATS:
            raise ConfigError(f"DELTAFLUSH_TABLE_FORMAT={self.table_format!r} is not one of "
                              f"{', '.join(FORMATS)}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", self.redis_url)
        if not self.flush_at_bytes:
            object.__setattr__(self, "flush_at_bytes", self.max_file_bytes)
        for name in ("flush_interval_s", "lease_s", "task_time_limit_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_file_bytes < 1024:
            raise ConfigError(
                f"max_file_bytes must be at least 1024, got {self.max_file_bytes!r}"
            )
        if self.max_batch_bytes < 1 or self.max_pending_bytes < 0:
            raise ConfigError(
                "max_batch_bytes must be > 0 and max_pending_bytes >= 0 (0: no limit), got "
                f"{self.max_batch_bytes!r} and {self.max_pending_bytes!r}"
            )
        if self.append_replicas < 0 or self.append_replicas_timeout_ms <= 0:
            raise ConfigError(
                "DELTAFLUSH_APPEND_REPLICAS must be >= 0 and "
                "DELTAFLUSH_APPEND_REPLICAS_TIMEOUT_MS > 0, got "
                f"{self.append_replicas!r} and {self.append_replicas_timeout_ms!r}")
        if not self.key_prefix or any(c in self.key_prefix for c in "{} "):
            raise ConfigError(
                f"key_prefix {self.key_prefix!r} must be non-empty and contain no braces "
                "or spaces"
            )

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Settings from ``DELTAFLUSH_*`` variables; keyword arguments that are not None win."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in _ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kwargs[name] = _parse(var, raw, types[name])
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(kwargs) - set(types)
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        return cls(**kwargs)


def _parse(var: str, raw: str, type_name: Any) -> Any:
    kind = str(type_name)
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}={raw!r} is not a valid boolean; set it to 1 or 0")
    try:
        if kind == "int":
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(
            f"{var}={raw!r} is not a valid {kind}; set it to a number, e.g. {var}=10"
        ) from None
    return raw
