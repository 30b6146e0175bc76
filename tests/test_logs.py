import json
import logging

import pytest

from tests.conftest import wait_for
from tests.test_fleet import TABLE, fill, wait_drained
from workers.logs import JsonFormatter


def test_json_formatter_writes_one_object_per_record():
    record = logging.LogRecord("workers.flusher", logging.INFO, __file__, 1,
                               "flushed table=%s rows=%d", ("events", 5), None)
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "flushed table=events rows=5"
    assert data["level"] == "INFO" and data["logger"] == "workers.flusher"


@pytest.mark.integration
def test_worker_logs_json_lines_with_one_line_per_flush(fleet, producer_for, real_redis):
    fleet.env["DELTAFLUSH_LOG_JSON"] = "1"
    p = producer_for()
    total = fill(p, batches=5)
    _, log = fleet.worker()
    p.flush(TABLE)
    wait_drained(fleet, real_redis, total)

    def flush_line():
        for line in log.read_text().splitlines():
            if line.startswith("{") and "flushed table=events" in line:
                return json.loads(line)
        return None

    line = wait_for(flush_line, 30, "the flush's log line")
    assert f"rows={total}" in line["message"] and "files=" in line["message"]


def test_dead_letters_are_logged_at_warning(any_redis, storage_dir, caplog):
    """The worker's default level is WARNING: a dead letter at INFO went unseen."""
    from producer import Producer, Settings, wire
    from tests.conftest import id_batch
    from workers.flusher import Flusher
    from workers.storage import Storage

    Producer(client=any_redis, settings=Settings()).append("events", id_batch(0, 3))
    any_redis.xadd(wire.Keys("deltaflush", "events").delta, {"arrow": b"garbage"})
    with caplog.at_level(logging.WARNING, logger="workers.flusher"):
        Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events")
    warned = [r.getMessage() for r in caplog.records
              if r.name == "workers.flusher" and r.levelno == logging.WARNING]
    assert any("deltaflush dead list events" in m for m in warned), warned


def test_fenced_flushes_are_logged_at_warning(monkeypatch, caplog):
    from producer.errors import LeaseLost
    from workers import tasks

    class Fenced:
        def flush(self, *args, **kwargs):
            raise LeaseLost("lost the lease on table 'events'")

    class Client:
        def delete(self, *keys):
            return 0

        def exists(self, *keys):
            return 0

        def hget(self, *args):  # the table's shard count: never sharded
            return None

    monkeypatch.setattr(tasks, "runtime", lambda: (Client(), Fenced()))
    with caplog.at_level(logging.WARNING, logger="workers.tasks"):
        result = tasks.flush_table.apply(args=["events"]).get()
    assert result["status"] == "fenced"
    assert [r.levelno for r in caplog.records if r.name == "workers.tasks"] == [logging.WARNING]
