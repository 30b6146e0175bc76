"""Shared fixtures: a real redis-server per session, fakeredis, storage folders, and real
Celery worker/beat processes started with the plain ``celery -A workers.app`` command."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import fakeredis
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import redis

from producer import Producer, Settings, wire

if TYPE_CHECKING:
    from tests.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server of the test's own, on a free port, that can be stopped and restarted."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        proc = self.proc
        wait_for(lambda: _ping(client) or proc.poll() is not None, 10, "redis-server to start")
        # The port was free when chosen, but another process may have taken it since: make
        # sure the server answering is this one, not another test session's.
        assert proc.poll() is None, f"redis-server exited at start: {self._log_tail()}"
        pid = client.info("server")["process_id"]
        client.close()
        assert pid == proc.pid, f"port {self.port} is answered by another redis-server ({pid})"

    def _log_tail(self) -> str:
        log = self.workdir / "redis.log"
        return log.read_text()[-2000:] if log.exists() else "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own with ``appendonly yes`` and ``appendfsync always``
    (what ``deltaflush doctor`` asks for), that may be killed and restarted."""
    server = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def real_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real 6-node Redis Cluster (tests/cluster.py) shared by the session's tests. Tests
    keep apart by key prefix (``cluster_prefix``); a test that kills or fails over nodes
    takes a cluster of its own (``own_cluster``)."""
    from tests.cluster import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A Redis Cluster of this test's own, for faults that change its topology."""
    from tests.cluster import LocalCluster

    cluster = LocalCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_prefix() -> str:
    """A key prefix of this test's own, so tests share ``redis_cluster`` without FLUSHALL."""
    return f"t{uuid.uuid4().hex[:10]}"


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def rabbitmq_vhost() -> Iterator[str]:
    """A vhost of this test's own on the RabbitMQ at 127.0.0.1:5672, removed after."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not installed: RabbitMQ must run at 127.0.0.1:5672")
    vhost = f"deltaflush-test-{uuid.uuid4().hex[:8]}"
    made = rabbitmqctl("add_vhost", vhost)
    assert made.returncode == 0, made.stderr
    try:
        allowed = rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        assert allowed.returncode == 0, allowed.stderr
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def fake_redis() -> redis.Redis:
    return fakeredis.FakeRedis()


@pytest.fixture(params=["fakeredis", "redis-server"])
def any_redis(request: pytest.FixtureRequest) -> redis.Redis:
    """The same test on fakeredis (fast protocol check) and on a real redis-server."""
    if request.param == "fakeredis":
        return fakeredis.FakeRedis()
    return request.getfixturevalue("real_redis")


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    path = tmp_path / "lake"
    path.mkdir()
    return path


def id_batch(start: int, rows: int, payload: str = "x") -> pa.Table:
    ids = pa.array(range(start, start + rows), pa.int64())
    return pa.table({
        "id": ids,
        "ts": pa.array([1_700_000_000_000_000 + i for i in range(start, start + rows)],
                       pa.timestamp("us", tz="UTC")),
        "name": pa.array([f"{payload}{i}" for i in range(start, start + rows)]),
        "value": pc.multiply(pc.cast(ids, pa.float64()), 0.25),
    })


def read_ids(root: Path | str, table: str) -> list[int]:
    """The ``id`` column of the table's published Parquet files, sorted.

    Only ``*.parquet`` files are read, never the folder as a whole: ``Storage.publish``
    creates the table's folder, then renames the first file into it, so a test that polls
    can find the folder empty, and a dataset of no file has no ``id`` column
    (``ArrowInvalid: No match for FieldRef.Name(id)``)."""
    path = Path(root) / table
    files = sorted(str(f) for f in path.rglob("*.parquet")
                   if not any(part[0] in "._" for part in f.relative_to(path).parts))
    if not files:
        return []
    return sorted(ds.dataset(files, format="parquet").to_table(columns=["id"])["id"]
                  .to_pylist())


def landed(client: redis.Redis, table: str, rows: int, prefix: str = "deltaflush") -> bool:
    """Whether ``rows`` rows of ``table`` have landed: flushed and committed (counted in
    ``:stats``), nothing left in its delta, and no flush under way (no lease, no claim).
    Poll this, then read the files: a folder is not a signal."""
    keys = wire.Keys(prefix, table)
    return (client.xlen(keys.delta) == 0 and not client.exists(keys.lease, keys.claim)
            and int(client.hget(keys.stats, "rows") or 0) >= rows)


def assert_exactly_once(root: Path | str, table: str, expected: int) -> None:
    ids = read_ids(root, table)
    dupes = len(ids) - len(set(ids))
    missing = sorted(set(range(expected)) - set(ids))
    assert dupes == 0, f"{dupes} duplicated rows in {table}"
    assert not missing, f"{len(missing)} rows missing from {table}, e.g. {missing[:5]}"
    assert len(ids) == expected


class Fleet:
    """Worker and beat processes for one test, started with ``celery -A workers.app``."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.workers: list[tuple[subprocess.Popen[bytes], int, str]] = []
        self.restarts = 0

    def worker(self, concurrency: int = 1, failpoints: str = "", pool: str = "prefork",
               wait: bool = True) -> tuple[subprocess.Popen[bytes], Path]:
        name = f"w{len(self.procs)}-{uuid.uuid4().hex[:6]}"
        log = self.logdir / f"{name}.log"
        env = dict(self.env, DELTAFLUSH_FAILPOINTS=failpoints)
        proc = self.spawn(
            ["worker", "-c", str(concurrency), "-n", f"{name}@%h", "-P", pool,
             "--loglevel=INFO", "--without-mingle", "--without-gossip"], log, env)
        self.procs.append((proc, log))
        self.workers.append((proc, concurrency, failpoints))
        if wait:
            wait_for(lambda: b" ready." in log.read_bytes() or proc.poll() is not None, 60,
                     f"worker {name} to start")
            assert proc.poll() is None, log.read_text()
        return proc, log

    def restart_dead_workers(self) -> int:
        """What a supervisor does (compose `restart: unless-stopped`, Kubernetes): start a
        worker again whose process has exited. Returns how many were restarted."""
        restarted = 0
        for i, (proc, concurrency, failpoints) in enumerate(list(self.workers)):
            if proc.poll() is not None:
                self.workers[i] = (proc, 0, "")  # replaced; never restarted twice
                if concurrency:
                    self.worker(concurrency, failpoints, wait=False)
                    restarted += 1
        self.restarts += restarted
        return restarted

    def spawn(self, args: list[str], log: Path, env: dict[str, str],
              **popen: object) -> subprocess.Popen[bytes]:
        """Run ``celery -A workers.app ARGS``, the plain command users run."""
        with log.open("wb") as out:
            return subprocess.Popen([CELERY, "-A", "workers.app", *args], env=env,
                                    cwd=self.logdir, stdout=out, stderr=subprocess.STDOUT,
                                    **popen)  # type: ignore[call-overload]

    def beat(self) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logdir / f"beat-{len(self.procs)}.log"
        proc = self.spawn(["beat", "--loglevel=INFO"], log, self.env)
        self.procs.append((proc, log))
        return proc, log

    def logs(self) -> str:
        """The end of every process's log, for a failure message."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}"
                         for _, log in self.procs)

    def logged(self, text: str) -> bool:
        """Whether any process's whole log holds ``text``."""
        return any(text in log.read_text(errors="replace") for _, log in self.procs)

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def fleet_env(redis_server: RedisServer, real_redis: redis.Redis, storage_dir: Path,
              tmp_path: Path) -> dict[str, str]:
    once = tmp_path / "failpoints"
    once.mkdir()
    env = dict(os.environ)
    env.update(
        DELTAFLUSH_REDIS_URL=redis_server.url,
        DELTAFLUSH_STORAGE_URI=str(storage_dir),
        DELTAFLUSH_LEASE_S="2",
        DELTAFLUSH_FLUSH_INTERVAL_S="0.5",
        DELTAFLUSH_MAX_FILE_BYTES="65536",
        DELTAFLUSH_FAILPOINT_ONCE_DIR=str(once),
        PYTHONPATH=str(ROOT),
    )
    return env


@contextmanager
def own_fleet(env: dict[str, str], tmp_path: Path,
              fleet_class: type[Fleet] = Fleet) -> Iterator[Fleet]:
    """A fleet for ``env`` (a Redis, broker or settings other than the ``fleet`` fixture's),
    logging to ``tmp_path/logs``; its processes are stopped on leaving, failed or not."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    fleet = fleet_class(env, logdir)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    with own_fleet(fleet_env, tmp_path) as f:
        yield f


@pytest.fixture
def producer_for(fleet_env: dict[str, str]) -> Iterator[Callable[[], Producer]]:
    made: list[Producer] = []

    def make() -> Producer:
        p = Producer(settings=Settings.from_env(fleet_env))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
