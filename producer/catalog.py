"""The Iceberg catalog of deltaflush's lake tables, built from the settings.

``DELTAFLUSH_CATALOG_URI`` chooses it:

* ``sqlite:////abs/path.db``, ``postgresql+psycopg://user@host/db`` (psycopg 3, or
  ``postgresql+psycopg2://``; any SQLAlchemy URL):
  pyiceberg's SQL catalog, whose table ``iceberg_tables`` maps each table to its current
  metadata file; a commit is a compare-and-set of that row, so concurrent writers conflict
  instead of overwriting each other;
* ``http://`` / ``https://``: an Iceberg REST catalog; query parameters become catalog
  properties (``https://host/api/catalog?warehouse=lake&token=...``), except ``timeout``:
  the seconds a request to the catalog may take (default ``REST_TIMEOUT_S``). pyiceberg
  sets none, and a catalog that stalls would hold a flush, and its table's lease, for as
  long as it stalls; timed out, a commit's outcome is unknown and the retry looks at the
  table first;
* empty: a SQLite catalog in the storage root, ``{root}/_deltaflush/catalog.db``, when the
  storage is a local folder (a folder starting with ``_`` is never a table).

Tables are ``<DELTAFLUSH_CATALOG_NAMESPACE>.<table>`` with their data at
``{storage}/{table}``; the file IO properties (S3 endpoint, region) come from the storage
URI, so the catalog and the flushers write to the same place.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlparse

from producer.errors import ConfigError
from producer.settings import Settings

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

    from producer.storage import Storage

#: The name of the catalog: a SQL catalog keys its rows by it (a Spark or DuckDB reader
#: configuring the same SQL database must use this name too).
CATALOG_NAME = "deltaflush"
#: deltaflush's own folder in the storage root (the default SQLite catalog lives there).
OWN_FOLDER = "_deltaflush"
#: Seconds a request to a REST catalog may take (connecting, then each wait for data).
REST_TIMEOUT_S = 60.0


def catalog_uri(settings: Settings, storage: Storage) -> str:
    """The catalog's URI: the setting, or the default SQLite file of a local storage."""
    if settings.catalog_uri:
        return settings.catalog_uri
    if not storage.local:
        raise ConfigError(
            f"DELTAFLUSH_CATALOG_URI must be set for Iceberg tables when the storage is not a "
            f"local folder (DELTAFLUSH_STORAGE_URI={settings.storage_uri!r}); e.g. "
            "DELTAFLUSH_CATALOG_URI=postgresql+psycopg2://deltaflush@db/lake or an Iceberg "
            "REST catalog's https:// address")
    return f"sqlite:///{os.path.join(storage.root, OWN_FOLDER, 'catalog.db')}"


def storage_location(storage: Storage, path: str) -> str:
    """A storage path as a URI that the catalog and every reader resolve the same way."""
    return f"file://{path}" if storage.local else storage.display(path)


def file_io_properties(storage_uri: str) -> dict[str, str]:
    """pyiceberg FileIO properties matching a ``DELTAFLUSH_STORAGE_URI`` (S3 endpoint,
    region and credentials given in its query string; others rely on the environment)."""
    parsed = urlparse(storage_uri)
    if parsed.scheme != "s3":
        return {}
    query = dict(parse_qsl(parsed.query))
    props = {}
    if "endpoint_override" in query:
        endpoint = query["endpoint_override"]
        if "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        props["s3.endpoint"] = endpoint
    for ours, theirs in (("region", "s3.region"), ("access_key", "s3.access-key-id"),
                         ("secret_key", "s3.secret-access-key"),
                         ("session_token", "s3.session-token")):
        if ours in query:
            props[theirs] = query[ours]
    return props


def namespace(settings: Settings) -> tuple[str, ...]:
    return tuple(settings.catalog_namespace.split("."))


def identifier(settings: Settings, table: str) -> tuple[str, ...]:
    """The catalog identifier of deltaflush table ``table``."""
    return (*namespace(settings), table)


def load(settings: Settings, storage: Storage) -> Catalog:
    """Connect to the catalog (see the module doc); its namespace is created if missing."""
    uri = catalog_uri(settings, storage)
    props = {"warehouse": storage_location(storage, storage.root),
             **file_io_properties(settings.storage_uri)}
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        from pyiceberg.catalog.rest import RestCatalog

        parsed = urlparse(uri)
        query = dict(parse_qsl(parsed.query))
        try:
            timeout = float(query.pop("timeout", REST_TIMEOUT_S))
        except ValueError as exc:
            raise ConfigError(f"DELTAFLUSH_CATALOG_URI: timeout must be seconds: {exc}"
                              ) from exc
        props.update(query)
        base = parsed._replace(query="").geturl()
        catalog: Catalog = RestCatalog(CATALOG_NAME, uri=base, **props)
        with_timeout(catalog, timeout)
    elif scheme.startswith(("sqlite", "postgresql", "mysql")):
        from producer.sqlcatalog import SqlCatalog

        if scheme.startswith("sqlite"):
            folder = os.path.dirname(urlparse(uri).path)
            if folder:
                os.makedirs(folder, exist_ok=True)
        catalog = SqlCatalog(CATALOG_NAME, uri=uri, **props)
    else:
        raise ConfigError(f"DELTAFLUSH_CATALOG_URI={uri!r} is not a catalog deltaflush knows: "
                          "use sqlite:////abs/path.db, postgresql+psycopg2://..., or an "
                          "Iceberg REST catalog's http(s):// address")
    catalog.create_namespace_if_not_exists(namespace(settings))
    return catalog


def with_timeout(catalog: Catalog, seconds: float) -> None:
    """Give every request of a REST catalog that has no timeout of its own ``seconds``
    (pyiceberg's session has none; see the module doc)."""
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        def send(self, request, stream=False, timeout=None, verify=True, cert=None,  # type: ignore[no-untyped-def]
                 proxies=None):
            return super().send(request, stream=stream,
                                timeout=seconds if timeout is None else timeout,
                                verify=verify, cert=cert, proxies=proxies)

    session = catalog._session  # type: ignore[attr-defined]
    for scheme in ("http://", "https://"):
        session.mount(scheme, TimeoutAdapter())
