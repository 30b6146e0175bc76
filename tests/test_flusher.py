"""The flush protocol, driven directly (no Celery), on fakeredis and on a real redis-server."""

import gc
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer import LeaseLost, Producer, Settings, wire
from tests import seams
from tests.conftest import assert_exactly_once, id_batch, read_ids
from tests.reliability import check
from workers import lease as lease_mod
from workers.flusher import Flusher, file_name
from workers.sources.redis_stream import RedisStream
from workers.storage import Storage

K = wire.Keys("deltaflush", "events")


def make(client, root, **kw):
    settings = Settings(**kw)
    return Producer(client=client, settings=settings), Flusher(client, Storage(str(root)),
                                                               settings)


def test_flush_writes_every_row_once_and_empties_the_delta(any_redis, storage_dir):
    p, f = make(any_redis, storage_dir)
    for i in range(20):
        p.append("events", id_batch(i * 50, 50))
    result = f.flush("events")
    assert (result.status, result.rows, result.files) == ("ok", 1000, 1)
    assert result.first_id and result.last_id and result.bytes > 0
    assert any_redis.xlen(K.delta) == 0 and not any_redis.exists(K.claim)
    assert not any_redis.exists(K.lease)
    assert_exactly_once(storage_dir, "events", 1000)
    stats = any_redis.hgetall(K.stats)
    assert (int(stats[b"rows"]), int(stats[b"files"])) == (1000, 1)
    assert any_redis.hget(K.pending, "rows") == b"0"
    assert f.flush("events").status == "empty"


def test_files_roll_at_max_file_bytes_and_carry_their_range(any_redis, storage_dir):
    p, f = make(any_redis, storage_dir, max_file_bytes=20_000)
    for i in range(30):
        p.append("events", id_batch(i * 100, 100))
    result = f.flush("events")
    assert result.files > 3
    assert_exactly_once(storage_dir, "events", 3000)
    files = sorted((storage_dir / "events").glob("*.parquet"))
    assert len(files) == result.files
    for path in files:
        md = pq.read_metadata(path)
        kv = {k.decode(): v.decode() for k, v in md.metadata.items()}
        assert path.name == file_name(kv["deltaflush.first_id"], kv["deltaflush.last_id"])
        assert int(kv["deltaflush.rows"]) == md.num_rows
        assert md.row_group(0).column(0).compression == "ZSTD"


def test_written_row_groups_go_to_the_disk_while_the_next_ones_encode(
        any_redis, storage_dir, monkeypatch):
    """Each row group of a local file is handed to the disk (posix_fadvise) once written,
    so that the fsync at publish finds little left; the file stays whole."""
    import os

    from workers import writer

    advised = []

    def fadvise(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))

    monkeypatch.setattr(writer.os, "posix_fadvise", fadvise)
    p, f = make(any_redis, storage_dir, max_file_bytes=4 << 20)
    for i in range(40):
        p.append("events", id_batch(i * 5000, 5000))
    assert f.flush("events").files >= 1
    assert len(advised) >= 3  # row groups ramp up: several per file
    # only temporary files, while they are being written
    assert all(advice == os.POSIX_FADV_DONTNEED and path.endswith(".tmp")
               for path, advice in advised)
    assert_exactly_once(storage_dir, "events", 200_000)


def test_output_is_readable_by_duckdb_and_polars(any_redis, storage_dir):
    import duckdb
    import polars as pl

    p, f = make(any_redis, storage_dir, max_file_bytes=20_000)
    for i in range(10):
        p.append("events", id_batch(i * 100, 100))
    f.flush("events")
    glob = f"{storage_dir}/events/*.parquet"
    n, s = duckdb.connect().execute(f"select count(*), sum(id) from read_parquet('{glob}', "
                      "hive_partitioning=true)").fetchone()
    assert (n, s) == (1000, sum(range(1000)))
    assert pl.read_parquet(glob)["id"].sort().to_list() == list(range(1000))


def test_corrupt_entries_go_to_dead_letters_and_the_rest_flushes(any_redis, storage_dir):
    p, f = make(any_redis, storage_dir)
    p.append("events", id_batch(0, 10))
    any_redis.xadd(K.delta, {"arrow": b"not arrow at all"})
    any_redis.xadd(K.delta, {"something": b"else"})
    foreign = pa.table({"id": ["a"]})  # valid IPC, impossible schema
    any_redis.xadd(K.delta, {"arrow": wire.encode_batches(foreign.schema, foreign.to_batches())})
    p.append("events", id_batch(10, 10))
    result = f.flush("events")
    assert (result.rows, result.dead) == (20, 3)
    check("corrupt, fieldless and wrong-schema entries between good ones", storage_dir,
          "events", range(20))
    dead = any_redis.xrange(K.dead)
    assert len(dead) == 3
    errors = [fields[b"error"].decode() for _, fields in dead]
    assert "not a valid Arrow IPC stream" in errors[0]
    assert "no 'arrow' field" in errors[1]
    assert "schema conflict in table 'events'" in errors[2]
    assert dead[0][1][b"arrow"] == b"not arrow at all"  # original fields kept
    assert all(b"entry_id" in fields for _, fields in dead)
    assert any_redis.xlen(K.delta) == 0


def test_a_delta_of_only_garbage_is_drained_to_dead_letters(any_redis, storage_dir):
    _, f = make(any_redis, storage_dir)
    any_redis.sadd("deltaflush:tables", "events")
    any_redis.xadd(K.delta, {"arrow": b"junk"})
    result = f.flush("events")
    assert (result.files, result.dead) == (0, 1)
    assert any_redis.xlen(K.delta) == 0 and any_redis.xlen(K.dead) == 1


def test_foreign_producer_without_schema_key_is_flushed(any_redis, storage_dir):
    _, f = make(any_redis, storage_dir)
    t = id_batch(0, 5)
    any_redis.xadd(K.delta, {"arrow": wire.encode_batches(t.schema, t.to_batches())})
    assert f.flush("events").rows == 5
    assert read_ids(storage_dir, "events") == list(range(5))


def test_a_busy_table_is_skipped(any_redis, storage_dir):
    p, f = make(any_redis, storage_dir)
    p.append("events", id_batch(0, 5))
    held = lease_mod.acquire(any_redis, K, 10_000)
    assert held is not None
    assert f.flush("events").status == "busy"
    assert any_redis.xlen(K.delta) == 1


def test_a_recorded_claim_is_resumed_exactly(any_redis, storage_dir):
    """Crash between recording the claim and committing: the next flush rewrites the
    same file from the same range, even though more entries arrived meanwhile."""
    p, f = make(any_redis, storage_dir)
    for i in range(4):
        p.append("events", id_batch(i * 10, 10))
    with pytest.raises(KeyboardInterrupt):
        seams.flusher(any_redis, storage_dir, source={"commit": seams.crash}).flush("events")
    claim = any_redis.hgetall(K.claim)
    assert int(claim[b"count"]) == 4
    first_files = sorted(p.name for p in (storage_dir / "events").glob("*.parquet"))
    assert len(first_files) == 1
    p.append("events", id_batch(40, 10))  # arrives after the claim
    result = f.flush("events")
    assert result.files == 2  # the resumed claim, then the new entry
    files = sorted(p.name for p in (storage_dir / "events").glob("*.parquet"))
    assert first_files[0] in files and len(files) == 2
    check("crash between recording the claim and the commit (resumed)", storage_dir, "events",
          range(50))


def test_a_commit_never_trims_entries_before_the_claimed_range(any_redis, storage_dir):
    """A claim that does not start at the head of the delta (which the protocol never
    makes) is refused at commit: nothing is trimmed, the flush fails loudly."""
    p, f = make(any_redis, storage_dir)
    ids = [p.append("events", id_batch(i * 10, 10)) for i in range(3)]
    any_redis.hset(K.claim, mapping={"first": ids[1], "last": ids[2], "count": 2,
                                     "schema": b"", "config": "", "token": 0})
    result = f.flush("events")
    assert result.status == "stuck" and "NOTHEAD" in result.error
    assert any_redis.xlen(K.delta) == 3
    assert b"NOTHEAD" in any_redis.hget(K.stuck, "reason")
    # stuck: no flush runs, whatever asks, until the mark is cleared
    again = f.flush("events")
    assert again.status == "stuck" and any_redis.xlen(K.delta) == 3


def test_a_fenced_flusher_cannot_commit(any_redis, storage_dir):
    """A flusher whose lease expired (frozen) and was taken over fails its commit."""
    p, _ = make(any_redis, storage_dir, lease_s=30)
    for i in range(3):
        p.append("events", id_batch(i * 10, 10))
    taken_over = {}

    def steal_then_commit(commit, lease, rng, tally):
        # the lease expires and another flusher takes the table and finishes it
        any_redis.delete(K.lease)
        other = Flusher(any_redis, Storage(str(storage_dir)), Settings())
        taken_over["result"] = other.flush("events")
        return commit(lease, rng, tally)

    f = seams.flusher(any_redis, storage_dir, Settings(lease_s=30),
                      source={"commit": steal_then_commit})
    with pytest.raises(LeaseLost):
        f.flush("events")
    assert taken_over["result"].rows == 30
    check("lease lost before the commit (fenced)", storage_dir, "events", range(30))
    assert int(any_redis.hget(K.stats, "rows")) == 30


def test_claim_mismatch_when_the_claimed_range_is_gone(any_redis, storage_dir):
    p, f = make(any_redis, storage_dir)
    p.append("events", id_batch(0, 10))
    first = any_redis.xrange(K.delta)[0][0].decode()
    any_redis.hset(K.claim, mapping={"first": first, "last": first, "count": 2, "schema": b""})
    result = f.flush("events")
    assert result.status == "stuck" and "read 1 entries" in result.error
    assert any_redis.xlen(K.delta) == 1  # nothing trimmed


def test_storage_error_trims_nothing_and_the_next_flush_lands_it(any_redis, storage_dir):
    p, f = make(any_redis, storage_dir)
    p.append("events", id_batch(0, 10))

    def broken(real, staged):
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        seams.flusher(any_redis, storage_dir, sink={"commit": broken}).flush("events")
    assert any_redis.xlen(K.delta) == 1
    assert not list((storage_dir / "events").glob("*.parquet")) if (
        storage_dir / "events").exists() else True
    assert not list(storage_dir.rglob("*.tmp"))  # the temporary file was cleaned up
    assert f.flush("events").rows == 10
    assert_exactly_once(storage_dir, "events", 10)


def test_the_next_range_is_read_while_the_last_one_commits_in_order(any_redis, storage_dir):
    """Ranges are pipelined: the next range is read while the one before commits; commits
    still come one at a time, in order, each at the head of the delta."""
    p, _ = make(any_redis, storage_dir, max_file_bytes=20_000)
    for i in range(30):
        p.append("events", id_batch(i * 100, 100))
    reading_ahead = threading.Event()
    committed = []

    def read(real, start, max_bytes):
        if isinstance(start, str):  # a range after one that is not committed yet
            reading_ahead.set()
        return real(start, max_bytes)

    def commit(real, lease, rng, tally):
        if not committed:  # the first range waits until the next one is being read
            assert reading_ahead.wait(30), "the next range was not read during the commit"
        head = any_redis.xrange(K.delta, count=1)[0][0].decode()
        committed.append((head, rng.first))
        return real(lease, rng, tally)

    f = seams.flusher(any_redis, storage_dir, Settings(max_file_bytes=20_000),
                      source={"read": read, "commit": commit})
    result = f.flush("events")
    assert result.files > 3 and len(committed) == result.files
    assert all(head == first for head, first in committed)  # each at the head, in order
    assert_exactly_once(storage_dir, "events", 3000)


def test_a_sorted_table_reads_no_range_ahead(any_redis, storage_dir):
    """A sorted file is held whole until it is written: the next range is read only once
    the one before is committed, so a flush holds one such file at a time."""
    p, _ = make(any_redis, storage_dir, max_file_bytes=20_000)
    p.configure("events", sort_by="value")
    for i in range(30):
        p.append("events", id_batch(i * 100, 100))
    commits = []
    ahead = []

    def read(real, start, max_bytes):
        if isinstance(start, str):
            ahead.append(len(commits))
        return real(start, max_bytes)

    def commit(real, lease, rng, tally):
        real(lease, rng, tally)
        commits.append(rng.last)

    f = seams.flusher(any_redis, storage_dir, Settings(max_file_bytes=20_000),
                      source={"read": read, "commit": commit})
    result = f.flush("events")
    assert result.files > 3
    assert ahead == list(range(1, len(ahead) + 1))  # each read after the commit before it
    assert_exactly_once(storage_dir, "events", 3000)


def test_a_range_read_ahead_stops_once_the_range_before_failed(any_redis, storage_dir):
    """When the range before fails while the next one is read, the read stops: nothing of
    it is claimed or trimmed and its staged files are removed."""
    p, _ = make(any_redis, storage_dir, max_file_bytes=20_000)
    for i in range(30):
        p.append("events", id_batch(i * 100, 100))
    reading_ahead = threading.Event()

    def read(real, start, max_bytes):
        if isinstance(start, str):
            reading_ahead.set()
        return real(start, max_bytes)

    def fenced(real, lease, rng):
        assert reading_ahead.wait(30)
        raise LeaseLost("fenced while recording the range before")

    f = seams.flusher(any_redis, storage_dir, Settings(max_file_bytes=20_000),
                      source={"read": read, "record_claim": fenced})
    with pytest.raises(LeaseLost):
        f.flush("events")
    assert not list(storage_dir.rglob("*.tmp"))  # its temporary file is removed
    assert any_redis.xlen(K.delta) == 30 and not any_redis.exists(K.claim)


def test_chunks_grow_at_most_fourfold_after_small_entries(any_redis, storage_dir,
                                                          monkeypatch):
    """A few small entries at the head must not make the next XRANGE ask for a thousand
    large ones (a gigabyte in one reply): each chunk asks for at most 4x the last."""
    p, f = make(any_redis, storage_dir)
    for i in range(3):
        p.append("events", id_batch(i, 1))
    for i in range(40):
        p.append("events", id_batch(100 + i * 2000, 2000, "x" * 100))
    counts = []
    # on the class: the source reads through a copy of the client (raw replies)
    real_xrange = type(any_redis).xrange

    def xrange(self, *args, count=None, **kw):
        counts.append(count)
        return real_xrange(self, *args, count=count, **kw)

    monkeypatch.setattr(type(any_redis), "xrange", xrange)
    assert f.flush("events").rows == 3 + 40 * 2000
    assert len(counts) > 2
    assert all(b <= 4 * a for a, b in zip(counts, counts[1:], strict=False)), counts


def test_a_failed_range_stops_the_ranges_read_after_it(any_redis, storage_dir):
    """When committing the second range to the sink fails, the first stays committed, the
    ranges read ahead are neither claimed nor trimmed, their temporary files are removed,
    and the next flush lands the rest exactly once."""
    p, f = make(any_redis, storage_dir, max_file_bytes=20_000)
    for i in range(30):
        p.append("events", id_batch(i * 100, 100))
    published = []

    def commit(real, staged):
        if published:
            raise OSError("disk on fire")
        published.append(staged.range)
        return real(staged)

    broken = seams.flusher(any_redis, storage_dir, Settings(max_file_bytes=20_000),
                           sink={"commit": commit})
    with pytest.raises(OSError, match="disk on fire"):
        broken.flush("events")
    assert len(list((storage_dir / "events").glob("*.parquet"))) == 1
    assert any_redis.hlen(K.claim) > 0  # the second range's claim waits to be resumed
    assert 0 < any_redis.xlen(K.delta) < 30
    assert not list(storage_dir.rglob("*.tmp"))
    assert f.flush("events").status == "ok"
    assert any_redis.xlen(K.delta) == 0
    assert_exactly_once(storage_dir, "events", 3000)


def test_concurrent_flushers_and_producers_land_every_row_once(real_redis, storage_dir):
    """Four flushers race on one table while a producer appends: no loss, no duplicate."""
    p, _ = make(real_redis, storage_dir, max_file_bytes=16_384)
    stop = threading.Event()
    errors: list[BaseException] = []
    results = []

    def flusher() -> None:
        f = Flusher(real_redis, Storage(str(storage_dir)), Settings(max_file_bytes=16_384))
        try:
            while not stop.is_set():
                results.append(f.flush("events"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=flusher) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        p.append("events", id_batch(i * 20, 20))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    Flusher(real_redis, Storage(str(storage_dir)), Settings()).flush("events")
    assert real_redis.xlen(K.delta) == 0
    check("4 flusher threads racing on one table while appending", storage_dir, "events",
          range(4000))
    assert {r.status for r in results} >= {"busy"} or len(results) > 4


def test_time_budget_stops_taking_claims(any_redis, storage_dir):
    p, f = make(any_redis, storage_dir, max_file_bytes=4096)
    for i in range(10):
        p.append("events", id_batch(i * 100, 100))
    result = f.flush("events", budget_s=0)
    assert result.files == 1 and result.more and result.rows < 1000
    assert f.flush("events").rows == 1000 - result.rows
    assert_exactly_once(storage_dir, "events", 1000)


def test_the_source_leaves_the_clients_connections_alone(real_redis):
    """The range source reads XRANGE replies through a copy of the client (raw replies):
    the copy going away must not close the pool it shares, whose connections other threads
    may be using."""
    conn = real_redis.connection_pool.get_connection()
    try:
        conn.send_command("PING")
        assert conn.read_response() == b"PONG"
        sock = conn._sock
        source = RedisStream(real_redis, K)
        assert source._raw is not None and source._raw is not real_redis
        del source
        gc.collect()
        assert conn._sock is sock  # not disconnected
        conn.send_command("PING")
        assert conn.read_response() == b"PONG"
    finally:
        real_redis.connection_pool.release(conn)
