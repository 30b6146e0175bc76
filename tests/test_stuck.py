"""A table whose state breaks the flush protocol is marked stuck, not retried in a loop:
visible in status, metrics and the task result; the fleet keeps flushing the other tables;
an operator clears the mark once the cause is fixed."""

import pytest
from click.testing import CliRunner

from producer import Producer, Settings, wire
from tests.conftest import assert_exactly_once, free_port, id_batch, wait_for
from tests.test_metrics import scrape
from workers.app import make_app
from workers.cli import main
from workers.flusher import Flusher
from workers.metrics import serve
from workers.scheduler import due_tables
from workers.status import table_status
from workers.storage import Storage

K = wire.Keys("deltaflush", "broken")


def break_table(client, p):
    """A claim that does not start at the head of the delta: the commit refuses (NOTHEAD)."""
    ids = [p.append("broken", id_batch(i * 10, 10)) for i in range(3)]
    client.hset(K.claim, mapping={"first": ids[1], "last": ids[2], "count": 2,
                                  "schema": b"", "config": "", "token": 0})


def test_a_stuck_table_shows_in_status_metrics_and_is_skipped_by_the_scheduler(
        any_redis, storage_dir):
    p = Producer(client=any_redis, settings=Settings())
    break_table(any_redis, p)
    p.append("healthy", id_batch(0, 5))
    f = Flusher(any_redis, Storage(str(storage_dir)), Settings())
    result = f.flush("broken")
    assert result.status == "stuck" and "NOTHEAD" in result.error
    assert f.flush("healthy").status == "ok"
    status = {s.table: s for s in table_status(any_redis, "deltaflush")}
    assert status["broken"].state == "stuck" and "NOTHEAD" in status["broken"].stuck
    assert status["healthy"].state == "idle"
    p.append("healthy", id_batch(5, 5))
    assert due_tables(any_redis, "deltaflush", 10_000) == ["healthy"]


def test_stuck_gauge_for_alerts(real_redis, storage_dir):
    p = Producer(client=real_redis, settings=Settings())
    break_table(real_redis, p)
    Flusher(real_redis, Storage(str(storage_dir)), Settings()).flush("broken")
    port = free_port()
    server = serve(real_redis, "deltaflush", port, "127.0.0.1")
    try:
        assert scrape(port)[("deltaflush_stuck", "broken", None)] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_unstick_once_the_cause_is_fixed(redis_server, real_redis, storage_dir):
    env = {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir)}
    p = Producer(client=real_redis, settings=Settings())
    break_table(real_redis, p)
    out = CliRunner().invoke(main, ["flush", "--local", "broken"], env=env)
    assert "stuck" in out.output
    out = CliRunner().invoke(main, ["status"], env=env)
    assert "stuck" in out.output
    real_redis.delete(K.claim)  # the operator fixes the cause...
    out = CliRunner().invoke(main, ["table", "unstick", "broken"], env=env)
    assert out.exit_code == 0 and "NOTHEAD" in out.output
    out = CliRunner().invoke(main, ["flush", "--local", "broken"], env=env)
    assert "ok, 30 rows" in out.output, out.output
    assert_exactly_once(storage_dir, "broken", 30)


@pytest.mark.integration
def test_a_worker_reports_stuck_and_keeps_flushing_other_tables(fleet, fleet_env, producer_for,
                                                                real_redis, storage_dir):
    p = producer_for()
    break_table(real_redis, p)
    fleet.worker()
    app = make_app(Settings.from_env(fleet_env))
    result = app.send_task("flush_table", args=["broken"], queue=wire.QUEUE).get(timeout=60)
    assert result["status"] == "stuck" and "NOTHEAD" in result["error"]
    fleet.beat()
    for i in range(10):
        p.append("healthy", id_batch(i * 10, 10))
    wait_for(lambda: real_redis.xlen("deltaflush:{healthy}:delta") == 0, 60, "healthy drained")
    assert_exactly_once(storage_dir, "healthy", 100)
    assert real_redis.xlen(K.delta) == 3  # the stuck table was left alone
    assert fleet.logged("stuck") and fleet.logged("WARNING"), fleet.logs()
    app.close()
