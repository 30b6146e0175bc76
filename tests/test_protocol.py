"""The flush protocol through its seams: the same tests over each range source (in memory,
and a Redis stream on fakeredis and on a real redis-server) and each sink (in memory, the
folder of Parquet files, an Iceberg table read back by DuckDB, a Delta table). Faults are
injected by wrapping a seam (``tests.seams``)."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from producer import Producer, Settings, wire
from producer.errors import LeaseLost
from tests.conftest import id_batch, read_ids
from tests.delta_readers import deltalake_ids, table_exists
from tests.lake import duckdb_ids
from tests.seams import CommitTwice, FlushInThread, Hooked
from workers.flusher import Flusher
from workers.sinks.delta import DeltaSink
from workers.sinks.folder import FolderSink
from workers.sinks.iceberg import IcebergSink
from workers.sinks.memory import MemorySink
from workers.sources.memory import MemoryStream
from workers.sources.redis_stream import RedisStream
from workers.storage import Storage

SETTINGS = Settings(max_file_bytes=8_000)


class Rig:
    """A source and a sink of one kind each, and how to append to and read back from them."""

    def __init__(self, source_kind: str, sink_kind: str, request: pytest.FixtureRequest,
                 tmp_path) -> None:
        self.sink_kind = sink_kind
        self.root = tmp_path / "lake"
        if source_kind == "memory":
            self.stream = MemoryStream("events")
            self.client = None
            self._append = self.stream.append
        else:
            self.client = request.getfixturevalue(
                "fake_redis" if source_kind == "fakeredis" else "real_redis")
            producer = Producer(client=self.client, settings=SETTINGS)
            self._append = lambda data: producer.append("events", data)
        storage = Storage(str(self.root))
        if sink_kind == "memory":
            self.sink = MemorySink()
        elif sink_kind == "iceberg":
            self.sink = IcebergSink(storage, SETTINGS)
        elif sink_kind == "delta":
            self.sink = DeltaSink(storage, SETTINGS.max_file_bytes)
        else:
            self.sink = FolderSink(storage, SETTINGS.max_file_bytes)

    def append(self, data: pa.Table) -> str:
        return self._append(data)

    def source(self):
        if self.client is None:
            return self.stream
        return RedisStream(self.client, wire.Keys("deltaflush", "events"))

    def flusher(self, source_hooks=None, sink_hooks=None) -> Flusher:
        sink = Hooked(self.sink, **sink_hooks) if sink_hooks else self.sink
        return Flusher(self.client, Storage(str(self.root)), SETTINGS, sink=sink,
                       source=lambda table: Hooked(self.source(), **(source_hooks or {})))

    def ids(self) -> list[int]:
        if self.sink_kind == "folder":
            return read_ids(self.root, "events")
        if self.sink_kind == "iceberg":
            return duckdb_ids(self.root, "events")
        if self.sink_kind == "delta":
            uri = self.root / "events"
            return deltalake_ids(uri) if table_exists(uri) else []
        rows = self.sink.table("events")
        return sorted(rows["id"].to_pylist()) if rows is not None else []

    def pending(self) -> bool:
        return self.source().pending()


@pytest.fixture(params=["memory", "fakeredis", "redis-server"])
def source_kind(request):
    return request.param


@pytest.fixture(params=["memory", "folder", "iceberg", "delta"])
def rig(request, source_kind, tmp_path) -> Rig:
    return Rig(source_kind, request.param, request, tmp_path)


def fill(rig: Rig, batches: int = 12, rows: int = 50) -> int:
    for i in range(batches):
        rig.append(id_batch(i * rows, rows))
    return batches * rows


def test_a_flush_drains_every_row_once(rig):
    total = fill(rig)
    result = rig.flusher().flush("events")
    assert result.status == "ok" and result.rows == total and result.files > 1
    assert rig.ids() == list(range(total)) and not rig.pending()
    assert rig.flusher().flush("events").status == "empty"


#: Every call of the protocol on a seam, and whether the crash comes before or after it.
CRASHES = [(seam, method, when) for seam, method in (
    ("source", "record_claim"), ("sink", "commit"), ("source", "commit"))
    for when in ("before", "after")]


@pytest.mark.parametrize("seam, method, when", CRASHES)
@pytest.mark.parametrize("nth", [1, 2])
def test_a_crash_at_any_step_loses_and_duplicates_nothing(rig, seam, method, when, nth):
    """The process dies at the ``nth`` call of a step; a new flusher finishes the work."""
    total = fill(rig)
    calls = []

    def crash(real, *args, **kwargs):
        calls.append(method)
        if len(calls) == nth and when == "before":
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return out

    hooks = {method: crash}
    broken = rig.flusher(**{f"{seam}_hooks": hooks})
    with pytest.raises(KeyboardInterrupt):
        broken.flush("events")
    if rig.client is None:
        rig.stream.expire_lease()  # the dead process's lease runs out
    else:
        rig.client.delete("deltaflush:{events}:lease")
    assert rig.flusher().flush("events").status == "ok"
    assert rig.ids() == list(range(total)) and not rig.pending()


def test_a_zombie_woken_after_a_takeover_commits_nothing_twice(rig):
    """A flusher frozen after recording its claim: its lease runs out, another flusher
    drains the table, then the frozen one wakes and tries to commit its range."""
    total = fill(rig, batches=4)
    frozen, woken = threading.Event(), threading.Event()

    def freeze(real, *args):
        frozen.set()
        assert woken.wait(30)
        return real(*args)

    zombie = rig.flusher(sink_hooks={"commit": freeze})
    thread = FlushInThread(zombie, "events")
    assert frozen.wait(30)
    if rig.client is None:
        rig.stream.expire_lease()
    else:
        rig.client.delete("deltaflush:{events}:lease")
    assert rig.flusher().flush("events").rows == total
    woken.set()
    thread.join(30)
    assert isinstance(thread.error, LeaseLost)
    assert rig.ids() == list(range(total)) and not rig.pending()


def test_dead_letters_are_set_aside_and_the_rest_flushes(rig):
    rig.append(id_batch(0, 10))
    if rig.client is None:
        rig.stream.append(None, {wire.FIELD_ARROW: b"garbage"})
    else:
        rig.client.xadd("deltaflush:{events}:delta", {"arrow": b"garbage"})
    rig.append(id_batch(10, 10))
    result = rig.flusher().flush("events")
    assert (result.rows, result.dead) == (20, 1)
    assert rig.ids() == list(range(20)) and not rig.pending()


def test_a_commit_the_sink_holds_already_is_a_no_op():
    """Sinks are idempotent by range: the same staged range committed twice lands once."""
    stream, sink = MemoryStream("events"), MemorySink()
    stream.append(id_batch(0, 10))
    twice = CommitTwice()

    flusher = Flusher(None, Storage("/nonexistent"), SETTINGS,
                      sink=Hooked(sink, commit=twice), source=lambda t: stream)
    assert flusher.flush("events").rows == 10
    assert [c.already for c in twice.first] == [False]  # the second commit was a no-op...
    assert sink.table("events").num_rows == 10      # ...that added nothing
    assert sink.last_committed("events", "events") == "1-0"
