"""Where a table's Delta table lives, how delta-rs reaches it, and how to commit to it safely
on object storage.

A table's Delta table is at ``{storage}/{table}`` with its log in ``_delta_log/``. The
storage URI is pyarrow's (``s3://bucket/prefix?endpoint_override=host:port&scheme=http&
region=...``); delta-rs takes the same location as ``s3://bucket/prefix/table`` with
``AWS_*`` storage options, which ``location`` derives from the URI's query (credentials
come from the environment, as for pyarrow).

**Concurrent commits on S3.** A Delta commit is the creation of the log file of the next
version, and it is safe only if that creation fails when the file exists. delta-rs (1.x)
creates it with a conditional PUT (``If-None-Match: *``), which AWS S3 has honoured since
August 2024, as do MinIO, Cloudflare R2 and moto: no lock service needed. A store without
conditional PUTs needs delta-rs's DynamoDB log store (``AWS_S3_LOCKING_PROVIDER=dynamodb``,
``DELTA_DYNAMO_TABLE_NAME``). ``AWS_S3_ALLOW_UNSAFE_RENAME=true`` would let two workers
overwrite each other's commit, losing one: a fleet always has several writers, so
``location`` refuses it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from producer.errors import ConfigError, LakePanic
from producer.storage import Storage

UNSAFE_RENAME = "AWS_S3_ALLOW_UNSAFE_RENAME"

#: Bits of an entry ID's sequence number in an app-transaction version (the record of the
#: ranges a Delta table holds, ``workers.sinks.delta_schema``).
SEQ_BITS = 21
APP_PREFIX = "deltaflush:"


def app_id(stream: str) -> str:
    """The Delta app ID under which the commits of ``stream`` record their ranges."""
    return APP_PREFIX + stream


def entry_id(version: int) -> str:
    """The entry ID an app-transaction version stands for: ``ms << 21 | seq`` -> ``ms-seq``
    (``workers.sinks.delta_schema.txn_version`` makes them)."""
    return f"{version >> SEQ_BITS}-{version & ((1 << SEQ_BITS) - 1)}"


@contextmanager
def panics_as_errors(what: str) -> Iterator[None]:
    """Run delta-rs calls, turning a panic of delta-rs (pyo3's ``PanicException``, a
    ``BaseException`` that is not importable) into ``LakePanic`` (see there). ``what``: what
    was being done, for the message. Works as a decorator too."""
    try:
        yield
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise LakePanic(
            f"delta-rs panicked while {what}: {exc}. This is a bug in delta-rs (deltalake), met "
            "by this table's data or log; nothing was trimmed from Redis. Upgrade deltalake or "
            "report the message to delta-rs, then `deltaflush table unstick` the table") from exc


#: pyarrow S3 URI query parameters -> delta-rs (object_store) storage options
_S3_OPTIONS = {
    "region": "AWS_REGION",
    "access_key": "AWS_ACCESS_KEY_ID",
    "secret_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
}


@dataclass(frozen=True)
class Location:
    """A Delta table as delta-rs reaches it: its URI and storage options."""

    uri: str
    options: dict[str, str] = field(default_factory=dict)

    def open(self, factory: Any = DeltaTable) -> Any | None:
        """The table at its latest version (made by ``factory``, ``DeltaTable`` or a
        subclass of it), or None if there is none yet."""
        try:
            return factory(self.uri, storage_options=self.options or None)
        except TableNotFoundError:
            return None


def location(storage: Storage, table: str,
             env: Mapping[str, str] | None = None) -> Location:
    """Where ``table``'s Delta table is on ``storage``. Raises ``ConfigError`` when the
    environment would make concurrent commits unsafe (see the module doc)."""
    env = os.environ if env is None else env
    if storage.local:
        return Location(os.path.join(storage.root, table))
    parsed = urlparse(storage.uri)
    uri = f"{parsed.scheme}://{storage.root}/{table}"
    if parsed.scheme != "s3":
        return Location(uri)
    if env.get(UNSAFE_RENAME, "").lower() in ("1", "true", "yes"):
        raise ConfigError(
            f"{UNSAFE_RENAME}=true lets two workers overwrite each other's Delta commits, "
            "losing one; unset it. delta-rs commits with conditional PUTs on S3 (AWS S3, "
            "MinIO, R2); for a store without them, set AWS_S3_LOCKING_PROVIDER=dynamodb "
            "(see docs/lake-delta.md)")
    return Location(uri, s3_options(parsed.query))


def s3_options(query: str) -> dict[str, str]:
    """delta-rs storage options from a pyarrow S3 URI's query string."""
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    options = {_S3_OPTIONS[k]: v for k, v in params.items() if k in _S3_OPTIONS}
    scheme = params.get("scheme", "https")
    endpoint = params.get("endpoint_override")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    if scheme == "http" or (endpoint or "").startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    if params.get("force_virtual_addressing", "").lower() == "true":
        options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "true"
    if params.get("anonymous", "").lower() == "true":
        options["AWS_SKIP_SIGNATURE"] = "true"
    return options
