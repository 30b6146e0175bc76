"""Iceberg catalogs and storages: PostgreSQL (the production SQL catalog, with its server cut
off mid-flush), S3 (moto's server) with a SQLite catalog, and the settings that choose them."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator

import pytest

from producer import Producer, Settings, wire
from producer.errors import CatalogUnavailable
from tests.conftest import id_batch
from tests.lake import connect
from tests.reliability import check_ids
from tests.test_storage import s3_uri  # noqa: F401 - the moto S3 fixture
from workers.flusher import Flusher
from workers.sinks.iceberg import IcebergSink
from workers.storage import Storage

PG = "127.0.0.1", 5432


class Proxy:
    """A TCP forwarder to PostgreSQL that the test can cut off (dropping every connection
    and each new one at once, as a database that went away) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.down = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.down = True
            for conn in self.conns:
                _close(conn)
            self.conns.clear()

    def restore(self) -> None:
        with self.lock:
            self.down = False

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.down:
                    _close(client)
                    continue
                server = socket.create_connection(self.target)
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            _close(a)
            _close(b)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A database of this test's own on the development PostgreSQL, dropped after."""
    psycopg2 = pytest.importorskip("psycopg2")
    name = f"deltaflush_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres",
                                 connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG[0]}:{PG[1]} is needed (trust auth): {exc}")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    yield name
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_postgresql_catalog_cut_off_mid_flush_loses_and_duplicates_nothing(
        driver, real_redis, storage_dir, pg_database):
    proxy = Proxy(PG)
    settings = Settings(max_file_bytes=8_000, table_format="iceberg",
                        catalog_uri=f"postgresql+{driver}://postgres@127.0.0.1:{proxy.port}/"
                                    f"{pg_database}")
    p = Producer(client=real_redis, settings=settings)
    for i in range(10):
        p.append("events", id_batch(i * 50, 50))
    sink = IcebergSink(Storage(str(storage_dir)), settings)
    flusher = Flusher(real_redis, Storage(str(storage_dir)), settings, sink=sink)
    assert flusher.flush("events").rows == 500
    for i in range(10, 20):
        p.append("events", id_batch(i * 50, 50))
    proxy.cut()
    with pytest.raises(CatalogUnavailable):
        flusher.flush("events")
    keys = wire.Keys("deltaflush", "events")
    assert real_redis.xlen(keys.delta) == 10  # nothing trimmed while the catalog is away
    proxy.restore()
    real_redis.delete(keys.lease)
    assert flusher.flush("events").status == "ok"
    table = sink.load("events")
    assert table is not None
    # the table row is in PostgreSQL, in pyiceberg's standard iceberg_tables
    import psycopg2

    with psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname=pg_database) as db:
        cur = db.cursor()
        cur.execute("SELECT table_namespace, metadata_location FROM iceberg_tables "
                    "WHERE table_name = 'events'")
        namespace, location = cur.fetchone()
    assert namespace == "deltaflush" and location == table.metadata_location
    ids = sorted(r[0] for r in connect().execute("SELECT id FROM iceberg_scan(?)",
                                                 [location]).fetchall())
    check_ids(f"iceberg: PostgreSQL catalog ({driver}) unreachable mid-flush, then back", ids,
              range(1000), None, str)
    sink.catalog.engine.dispose()  # type: ignore[attr-defined]
    p.close()
    proxy.close()


#: moto keeps its buckets per process, shared with tests/test_storage.py: a table of its own
S3_TABLE = "iceberg_events"


def test_an_iceberg_table_on_s3(real_redis, s3_uri, tmp_path):  # noqa: F811
    settings = Settings(storage_uri=s3_uri, max_file_bytes=16_384, table_format="iceberg",
                        catalog_uri=f"sqlite:///{tmp_path}/catalog.db")
    p = Producer(client=real_redis, settings=settings)
    for i in range(20):
        p.append(S3_TABLE, id_batch(i * 50, 50))
    storage = Storage(s3_uri)
    result = Flusher(real_redis, storage, settings).flush(S3_TABLE)
    assert result.rows == 1000 and result.files > 1
    assert all(path.startswith("s3://lake/prefix/iceberg_events/data/part-")
               for path in result.paths)
    table = IcebergSink(storage, settings).load(S3_TABLE)
    assert table is not None and table.location() == "s3://lake/prefix/iceberg_events"
    assert table.metadata_location.startswith("s3://lake/prefix/iceberg_events/metadata/")
    ids = sorted(table.scan().to_arrow()["id"].to_pylist())
    check_ids("iceberg on S3 (moto), read back by pyiceberg", ids, range(1000), None, str)
    p.close()
