"""Delta tables on S3 (moto's server): a flush, concurrent committers that lose no commit
(delta-rs's conditional PUT of each log entry), maintenance."""

from __future__ import annotations

import json
import os
import threading

import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable

from producer import Producer, Settings
from producer.tablecfg import TableConfig
from tests.conftest import id_batch
from tests.delta_readers import deltalake_ids, polars_ids
from tests.reliability import record
from tests.test_storage import s3_uri  # noqa: F401 - the moto server fixture
from workers.flusher import Flusher
from workers.sinks import StageStart
from workers.sinks.delta import DeltaSink
from workers.sinks.delta_table import location
from workers.sources import Range
from workers.storage import TMP_DIR, Storage
from workers.writer import Encoder


@pytest.fixture
def delta_s3(s3_uri):  # noqa: F811
    """moto's S3 under a prefix of its own (moto's state is global to the process: other
    modules' tests write to ``lake/prefix``)."""
    return s3_uri.replace("s3://lake/prefix", "s3://lake/delta", 1)


def flush_commits(storage: Storage, table: str) -> list[dict]:
    """The commit infos of the flushes in the table's log, read from its JSON files
    (``DeltaTable.history`` hangs on moto's listing of the log)."""
    selector = pafs.FileSelector(f"{storage.root}/{table}/_delta_log")
    infos = []
    for info in storage.fs.get_file_info(selector):
        if info.path.endswith(".json"):
            with storage.fs.open_input_stream(info.path) as f:
                for line in f.read().decode().splitlines():
                    commit = json.loads(line).get("commitInfo")
                    if commit and commit.get("deltaflush.operation") == "flush":
                        infos.append(commit)
    return infos


def test_a_flush_to_s3_lands_a_delta_table(real_redis, delta_s3):
    settings = Settings(storage_uri=delta_s3, max_file_bytes=16_384, table_format="delta")
    p = Producer(client=real_redis, settings=settings)
    for i in range(20):
        p.append("events", id_batch(i * 50, 50))
    storage = Storage(delta_s3)
    result = Flusher(real_redis, storage, settings).flush("events")
    assert result.rows == 1000 and result.files > 1
    assert all(path.startswith("s3://lake/delta/events/part-") for path in result.paths)
    loc = location(storage, "events")
    assert loc.uri == "s3://lake/delta/events"
    assert deltalake_ids(loc.uri, loc.options) == list(range(1000))
    assert polars_ids(loc.uri, loc.options) == list(range(1000))
    sink = DeltaSink(storage, settings.max_file_bytes)
    config = TableConfig(target_file_bytes=1 << 20)
    assert sink.compact("events", config)["compacted"] > 1
    assert sink.remove_orphans("events", config)["removed"] == 0
    assert deltalake_ids(loc.uri, loc.options) == list(range(1000))
    leftovers = storage.fs.get_file_info(pafs.FileSelector(
        f"lake/delta/{TMP_DIR}", recursive=True, allow_not_found=True))
    assert [i for i in leftovers if i.type == pafs.FileType.File] == []


def test_concurrent_committers_on_s3_lose_no_commit(delta_s3):
    """Four committers (as four workers, each flushing one shard of the table) commit at
    once, each from its own table version: every log entry is created only if absent, so
    the losers of a race rebase and commit again, and no commit overwrites another."""
    storage = Storage(delta_s3)
    schema = id_batch(0, 1).schema
    writers, ranges, rows = 4, 5, 10
    barrier = threading.Barrier(writers, timeout=60)
    errors: list[BaseException] = []

    def commit_shard(w: int) -> None:
        try:
            sink = DeltaSink(storage, 1 << 20)
            for r in range(ranges):
                first = f"{r + 1}-0"
                start = (w * ranges + r) * rows
                rng = Range("shards", f"shards:{w}", first, first, 1,
                            schema.serialize().to_pybytes(), "")
                with Encoder() as encoder:
                    staging = sink.stage(StageStart("shards", first, w + 1, schema,
                                                    TableConfig(), encoder))
                    staging.write(id_batch(start, rows))
                    staging.seal()
                    staged = staging.close(rng)
                barrier.wait()  # all four send their commit together
                assert not sink.commit(staged).already
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=commit_shard, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    loc = location(storage, "shards")
    dt = DeltaTable(loc.uri, storage_options=loc.options)
    assert len(flush_commits(storage, "shards")) == writers * ranges
    assert [dt.transaction_version(f"deltaflush:shards:{w}") for w in range(writers)] == \
        [ranges << 21] * writers
    ids = deltalake_ids(loc.uri, loc.options)
    total = writers * ranges * rows
    lost = len(set(range(total)) - set(ids))
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    record("delta: 4 committers racing on S3 (conditional PUT)", test, total, lost,
           len(ids) - len(set(ids)))
    assert ids == list(range(total))
