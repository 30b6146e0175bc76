"""A small Iceberg REST catalog server for the tests, following the Iceberg REST OpenAPI spec
(apache/iceberg ``open-api/rest-catalog-open-api.yaml``) for what deltaflush uses of it.

No production REST catalog (Polaris, Lakekeeper, Gravitino, the Java reference server) can
run here, so deltaflush's REST path is tested against this: a real HTTP server in its own
process, answered by pyiceberg's ``RestCatalog`` like any other. Its state is a pyiceberg
``SqlCatalog`` on SQLite (``{warehouse}/rest_catalog.db``), so the metadata files it
writes are real and any reader can open them.

    python -m tests.rest_catalog --port 8181 --warehouse /tmp/lake [--prefix lake]

Endpoints (under ``/v1/`` or ``/v1/{prefix}/`` when a prefix is set; the prefix is announced
in the config's ``overrides``)::

    GET    /v1/config
    GET    namespaces                      list (``parent``)
    POST   namespaces                      create; 409 AlreadyExistsException
    GET    namespaces/{ns}                 load; 404 NoSuchNamespaceException
    HEAD   namespaces/{ns}                 exists: 204 or 404
    GET    namespaces/{ns}/tables          list
    POST   namespaces/{ns}/tables          create, or stage-create (nothing stored: the
                                           client commits it with ``assert-create``)
    GET    namespaces/{ns}/tables/{t}      load; 404 NoSuchTableException
    HEAD   namespaces/{ns}/tables/{t}      exists: 204 or 404
    DELETE namespaces/{ns}/tables/{t}      drop (the metadata row; files stay)
    POST   namespaces/{ns}/tables/{t}      commit

**The commit** is what exactly-once writers rely on: under one lock, the table's current
metadata is loaded, every requirement of the request is validated against it (pyiceberg's
own ``TableRequirement.validate``: ``assert-create``, ``assert-table-uuid``,
``assert-ref-snapshot-id``, ...), and a failed one answers **409 CommitFailedException**
with nothing changed; otherwise the updates are applied with pyiceberg's
``update_table_metadata``, the new metadata file is written and the table's row is
swapped from the metadata file it was loaded at to the new one (a compare-and-set in
SQLite as well, under the lock). Errors are the spec's ``ErrorModel``:
``{"error": {"message", "type", "code"}}``.

Faults for tests, set at run time by ``POST /_test/faults`` (not part of the spec) with
``{"unavailable": N, "lose_answers": N, "hang": N}``: the next N commits that add a snapshot
answer 503 ServiceUnavailable without applying anything (a catalog briefly away), or are
applied and then answered 504 (a gateway that timed out: the client cannot know it landed),
or stall mid-commit (holding the commit lock) until ``{"release": 1}`` is posted, then are
applied as usual. ``GET /_test/faults`` shows what is left, the commits applied so far and
how many commits are stalled.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from pyiceberg.catalog import Catalog
from pyiceberg.catalog.rest import CreateTableRequest
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
)
from pyiceberg.io import load_file_io
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC
from pyiceberg.table import CommitTableRequest
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata, new_table_metadata
from pyiceberg.table.sorting import UNSORTED_SORT_ORDER
from pyiceberg.table.update import update_table_metadata
from sqlalchemy import insert, update
from sqlalchemy.orm import Session

log = logging.getLogger("rest_catalog")

#: The namespace separator of path parameters (the spec's default, ``%1F``).
SEPARATOR = "\x1f"
ENDPOINTS = [
    "GET /v1/{prefix}/namespaces", "POST /v1/{prefix}/namespaces",
    "GET /v1/{prefix}/namespaces/{namespace}", "HEAD /v1/{prefix}/namespaces/{namespace}",
    "GET /v1/{prefix}/namespaces/{namespace}/tables",
    "POST /v1/{prefix}/namespaces/{namespace}/tables",
    "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "HEAD /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "POST /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "DELETE /v1/{prefix}/namespaces/{namespace}/tables/{table}",
]


class RestError(Exception):
    """An error answered as the spec's ErrorModel."""

    def __init__(self, code: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.code, self.type, self.message = code, type_, message


def not_found_table(ident: tuple[str, ...]) -> RestError:
    return RestError(404, "NoSuchTableException", f"Table does not exist: {'.'.join(ident)}")


def not_found_namespace(ns: tuple[str, ...]) -> RestError:
    return RestError(404, "NoSuchNamespaceException",
                     f"Namespace does not exist: {'.'.join(ns)}")


class Backend:
    """The catalog's state: a SqlCatalog on SQLite, changed only under ``lock``."""

    def __init__(self, warehouse: str, prefix: str = "") -> None:
        os.makedirs(warehouse, exist_ok=True)
        self.warehouse = os.path.abspath(warehouse)
        self.prefix = prefix
        self.sql = SqlCatalog("rest", uri=f"sqlite:///{self.warehouse}/rest_catalog.db",
                              warehouse=f"file://{self.warehouse}")
        self.lock = threading.Lock()
        #: faults still to inject (see the module doc), and commits applied so far
        self.faults = {"unavailable": 0, "lose_answers": 0, "hang": 0}
        self.fault_lock = threading.Lock()
        self.released = threading.Event()
        self.stalled = 0
        self.commits = 0

    # --- namespaces -----------------------------------------------------------------

    def namespace_exists(self, ns: tuple[str, ...]) -> bool:
        return self.sql.namespace_exists(ns)

    def require_namespace(self, ns: tuple[str, ...]) -> None:
        if not self.namespace_exists(ns):
            raise not_found_namespace(ns)

    def create_namespace(self, ns: tuple[str, ...], props: dict[str, str]) -> None:
        with self.lock:
            try:
                self.sql.create_namespace(ns, props)
            except NamespaceAlreadyExistsError as exc:
                raise RestError(409, "AlreadyExistsException",
                                f"Namespace already exists: {'.'.join(ns)}") from exc

    # --- tables ---------------------------------------------------------------------

    def current(self, ident: tuple[str, ...]) -> tuple[str, TableMetadata] | None:
        try:
            table = self.sql.load_table(ident)
        except NoSuchTableError:
            return None
        return table.metadata_location, table.metadata

    def load(self, ident: tuple[str, ...]) -> tuple[str, TableMetadata]:
        found = self.current(ident)
        if found is None:
            raise not_found_table(ident)
        return found

    def new_metadata(self, ident: tuple[str, ...], request: CreateTableRequest
                     ) -> TableMetadata:
        location = request.location or self.sql._resolve_table_location(
            None, Catalog.namespace_to_string(ident[:-1]), ident[-1])
        return new_table_metadata(
            schema=request.table_schema,
            partition_spec=request.partition_spec or UNPARTITIONED_PARTITION_SPEC,
            sort_order=request.write_order or UNSORTED_SORT_ORDER,
            location=location.rstrip("/"), properties=dict(request.properties),
            table_uuid=uuid.uuid4())

    def create(self, ident: tuple[str, ...], request: CreateTableRequest
               ) -> tuple[str | None, TableMetadata]:
        """Create the table, or only build its metadata for a stage-create (the client then
        commits it with ``assert-create``)."""
        self.require_namespace(ident[:-1])
        metadata = self.new_metadata(ident, request)
        if request.stage_create:
            if self.current(ident) is not None:
                raise RestError(409, "AlreadyExistsException",
                                f"Table already exists: {'.'.join(ident)}")
            return None, metadata
        with self.lock:
            if self.current(ident) is not None:
                raise RestError(409, "AlreadyExistsException",
                                f"Table already exists: {'.'.join(ident)}")
            location = self._write(metadata, 0)
            self._swap(ident, None, location)
        return location, metadata

    def commit(self, ident: tuple[str, ...], request: CommitTableRequest
               ) -> tuple[str, TableMetadata]:
        """Check every requirement against the current metadata and apply the updates, as
        one step (see the module doc)."""
        with self.lock:
            found = self.current(ident)
            creating = any(r.type == "assert-create" for r in request.requirements)
            if found is None and not creating:
                raise not_found_table(ident)
            if found is None:
                self.require_namespace(ident[:-1])
            base = None if found is None else found[1]
            for requirement in request.requirements:
                try:
                    requirement.validate(base)
                except CommitFailedException as exc:
                    raise RestError(409, "CommitFailedException",
                                    f"Requirement failed: {exc}") from exc
            appending = any(u.action == "add-snapshot" for u in request.updates)
            if appending and self.fault("hang"):
                self.stalled += 1
                self.released.wait(120)  # a catalog stuck mid-commit
                self.stalled -= 1
            if appending and self.fault("unavailable"):
                raise RestError(503, "ServiceUnavailableException",
                                "injected: the catalog is unavailable")
            metadata = update_table_metadata(
                base_metadata=base if base is not None else self.sql._empty_table_metadata(),
                updates=request.updates, enforce_validation=found is None,
                metadata_location=None if found is None else found[0])
            if found is not None and metadata == found[1]:
                return found  # nothing changed
            version = 0 if found is None else self.sql._parse_metadata_version(found[0]) + 1
            location = self._write(metadata, version)
            self._swap(ident, None if found is None else found[0], location)
            self.commits += 1
            if appending and self.fault("lose_answers"):
                raise RestError(504, "CommitStateUnknownException",
                                "injected: the commit landed, its answer was lost")
            return location, metadata

    def fault(self, name: str) -> bool:
        """Whether to inject fault ``name`` now (one fewer left if so)."""
        with self.fault_lock:
            if self.faults[name] <= 0:
                return False
            self.faults[name] -= 1
            return True

    def set_faults(self, faults: dict[str, int]) -> dict[str, int]:
        with self.fault_lock:
            if faults.get("hang"):
                self.released.clear()
            if faults.get("release"):
                self.released.set()
            self.faults.update({k: int(v) for k, v in faults.items() if k in self.faults})
            return {**self.faults, "commits": self.commits, "stalled": self.stalled}

    def _write(self, metadata: TableMetadata, version: int) -> str:
        provider = load_location_provider(metadata.location, metadata.properties)
        path = provider.new_table_metadata_file_location(version)
        io = load_file_io(properties=dict(metadata.properties), location=path)
        self.sql._write_metadata(metadata, io, path)
        return path

    def _swap(self, ident: tuple[str, ...], expected: str | None, location: str) -> None:
        """Point the table's row at ``location`` if it still points at ``expected`` (or
        insert it, for a new table)."""
        namespace = Catalog.namespace_to_string(ident[:-1])
        with Session(self.sql.engine) as session:
            if expected is None:
                session.execute(insert(IcebergTables).values(
                    catalog_name=self.sql.name, table_namespace=namespace,
                    table_name=ident[-1], metadata_location=location,
                    previous_metadata_location=None))
            else:
                done = session.execute(
                    update(IcebergTables).where(
                        IcebergTables.catalog_name == self.sql.name,
                        IcebergTables.table_namespace == namespace,
                        IcebergTables.table_name == ident[-1],
                        IcebergTables.metadata_location == expected)
                    .values(metadata_location=location, previous_metadata_location=expected))
                if done.rowcount != 1:  # type: ignore[attr-defined]
                    raise RestError(409, "CommitFailedException",
                                    f"Table {'.'.join(ident)} was changed meanwhile")
            session.commit()

    def drop(self, ident: tuple[str, ...]) -> None:
        with self.lock:
            try:
                self.sql.drop_table(ident)
            except NoSuchTableError as exc:
                raise not_found_table(ident) from exc


def table_response(location: str | None, metadata: TableMetadata) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": json.loads(metadata.model_dump_json()), "config": {}}
    if location is not None:
        body["metadata-location"] = location
    return body


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            code, body = self._route(method, raw)
        except RestError as exc:
            code, body = exc.code, {"error": {"message": exc.message, "type": exc.type,
                                              "code": exc.code}}
        except Exception as exc:  # a bug of the server or a request it cannot parse
            log.exception("%s %s failed", method, self.path)
            status = 400 if type(exc).__name__ == "ValidationError" else 500
            code, body = status, {"error": {"message": str(exc), "type": type(exc).__name__,
                                            "code": status}}
        self._send(code, None if method == "HEAD" else body)

    def _send(self, code: int, body: dict[str, Any] | None) -> None:
        data = b"" if body is None or code == 204 else json.dumps(body).encode()
        self.send_response(code)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _route(self, method: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        backend = self.server.backend
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["_test", "faults"]:
            return 200, backend.set_faults(json.loads(raw) if method == "POST" else {})
        if parts[:1] != ["v1"]:
            raise RestError(404, "NotFoundException", f"no such path: {url.path}")
        parts = parts[1:]
        if parts == ["config"] and method == "GET":
            overrides = {"prefix": backend.prefix} if backend.prefix else {}
            return 200, {"defaults": {}, "overrides": overrides, "endpoints": ENDPOINTS}
        if backend.prefix:
            if parts[:1] != [backend.prefix]:
                raise RestError(404, "NotFoundException", f"no such prefix: {url.path}")
            parts = parts[1:]
        body = json.loads(raw) if raw else {}
        match parts:
            case ["namespaces"] if method == "GET":
                parent = tuple(query["parent"].split(SEPARATOR)) if query.get("parent") else ()
                if parent:
                    backend.require_namespace(parent)
                return 200, {"namespaces": [list(n) for n in backend.sql.list_namespaces(parent)]}
            case ["namespaces"] if method == "POST":
                ns = tuple(body["namespace"])
                props = body.get("properties") or {}
                backend.create_namespace(ns, props)
                return 200, {"namespace": list(ns), "properties": props}
            case ["namespaces", ns_path] if method in ("GET", "HEAD"):
                ns = tuple(ns_path.split(SEPARATOR))
                backend.require_namespace(ns)
                if method == "HEAD":
                    return 204, None
                return 200, {"namespace": list(ns),
                             "properties": backend.sql.load_namespace_properties(ns)}
            case ["namespaces", ns_path, "tables"] if method == "GET":
                ns = tuple(ns_path.split(SEPARATOR))
                backend.require_namespace(ns)
                return 200, {"identifiers": [{"namespace": list(t[:-1]), "name": t[-1]}
                                             for t in backend.sql.list_tables(ns)]}
            case ["namespaces", ns_path, "tables"] if method == "POST":
                request = CreateTableRequest.model_validate_json(raw)
                ident = (*ns_path.split(SEPARATOR), request.name)
                return 200, table_response(*backend.create(ident, request))
            case ["namespaces", ns_path, "tables", name]:
                ident = (*ns_path.split(SEPARATOR), name)
                if method == "HEAD":
                    backend.load(ident)
                    return 204, None
                if method == "GET":
                    return 200, table_response(*backend.load(ident))
                if method == "DELETE":
                    backend.drop(ident)
                    return 204, None
                if method == "POST":
                    commit = CommitTableRequest.model_validate_json(raw)
                    location, metadata = backend.commit(ident, commit)
                    return 200, {"metadata-location": location,
                                 "metadata": json.loads(metadata.model_dump_json())}
        raise RestError(404 if method in ("GET", "HEAD") else 405, "NotFoundException",
                        f"no route for {method} {url.path}")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend) -> None:
        super().__init__(address, Handler)
        self.backend = backend


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--warehouse", required=True)
    parser.add_argument("--prefix", default="")
    args = parser.parse_args(argv)
    if args.prefix and not re.fullmatch(r"[A-Za-z0-9_-]+", args.prefix):
        parser.error("--prefix: letters, digits, - and _ only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = Server((args.host, args.port),
                    Backend(args.warehouse, args.prefix))
    log.info("Iceberg REST catalog at http://%s:%d/ (warehouse %s)", args.host,
             server.server_address[1], args.warehouse)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
