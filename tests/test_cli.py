"""The deltaflush command: status, flush, demo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer import Producer, wire
from tests.conftest import ROOT, assert_exactly_once, id_batch
from workers.cli import main


@pytest.fixture
def cli_env(redis_server, real_redis, storage_dir):
    return {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir)}


def run(env, *args):
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result


def test_status_shows_pending_and_flushed_per_table(cli_env, redis_server):
    p = Producer(redis_url=redis_server.url)
    p.append("events", id_batch(0, 10))
    p.append("clicks", id_batch(0, 3))
    out = run(cli_env, "status")
    assert out.exit_code == 0
    lines = out.output.splitlines()
    assert lines[0].split()[:3] == ["table", "pending", "rows"]
    events = next(line for line in lines if line.startswith("events"))
    assert events.split()[1] == "10" and events.endswith("pending")
    data = json.loads(run(cli_env, "status", "--json").output)
    by_table = {d["table"]: d for d in data}
    assert by_table["clicks"]["pending_rows"] == 3
    assert by_table["events"]["pending_bytes"] > 0
    assert by_table["events"]["oldest_pending_age_s"] >= 0
    p.close()


def test_status_without_tables_says_how_to_start(cli_env):
    out = run(cli_env, "status")
    assert out.exit_code == 0 and "no tables yet" in out.output


def test_flush_local_and_status_after(cli_env, redis_server, storage_dir):
    p = Producer(redis_url=redis_server.url)
    for t in ("a", "b"):
        p.append(t, id_batch(0, 5))
    out = run(cli_env, "flush", "--all", "--local")
    assert out.exit_code == 0, out.output
    assert "[2/2] b: ok, 5 rows, 1 files" in out.output
    for t in ("a", "b"):
        assert_exactly_once(storage_dir, t, 5)
    data = {d["table"]: d for d in json.loads(run(cli_env, "status", "--json").output)}
    assert data["a"]["rows_flushed"] == 5 and data["a"]["pending_rows"] == 0
    p.close()


def test_flush_queues_a_task(cli_env, redis_server, real_redis):
    Producer(redis_url=redis_server.url).append("events", id_batch(0, 1))
    out = run(cli_env, "flush", "events")
    assert out.exit_code == 0 and "flush queued" in out.output
    assert real_redis.llen(wire.QUEUE) == 1
    assert "already queued" in run(cli_env, "flush", "events").output


@pytest.mark.parametrize("args,message", [
    (["flush"], "either a TABLE or --all"),
    (["flush", "bad-name"], "invalid table name"),
])
def test_flush_usage_errors(cli_env, args, message):
    out = CliRunner().invoke(main, args, env=cli_env)
    assert out.exit_code == 2 and message in out.output


def test_bad_setting_is_a_clear_usage_error(cli_env):
    out = CliRunner().invoke(main, ["status"], env=dict(cli_env, DELTAFLUSH_LEASE_S="soon"))
    assert out.exit_code == 2 and "DELTAFLUSH_LEASE_S='soon'" in out.output


@pytest.mark.integration
def test_demo_runs_the_pipeline_on_the_embedded_server(tmp_path):
    """`deltaflush demo` with nothing but the package: embedded Redis, worker, beat."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAFLUSH_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("deltaflush")), "demo", "--seconds", "3",
         "--tables", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded Redis-compatible server" in proc.stdout
    assert proc.stdout.count(": ok") == 2
    assert f"Parquet files are under {tmp_path}/data" in proc.stdout
    assert list((tmp_path / "data" / "demo_events_0").glob("*.parquet"))


def test_dead_list_and_replay(cli_env, redis_server, real_redis):
    p = Producer(redis_url=redis_server.url)
    p.append("events", id_batch(0, 5))
    k = wire.Keys("deltaflush", "events")
    real_redis.xadd(k.delta, {"arrow": b"garbage"})
    assert run(cli_env, "flush", "events", "--local").exit_code == 0
    out = run(cli_env, "dead", "list", "events")
    assert "not a valid Arrow IPC stream" in out.output and "1 dead letters in events" in out.output
    out = run(cli_env, "dead", "replay", "events")
    assert "replayed 0 dead letters of events; 1 still" in out.output
    assert real_redis.xlen(k.dead) == 1
    p.close()
