"""The deltaflush command: status, flush, demo."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer import Producer, Settings, wire
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


def run_demo(deltaflush: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([deltaflush, "demo", "--seconds", "3", "--tables", "2"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def check_demo_output(out: str, cwd: Path, env: dict[str, str]) -> str:
    """The demo's claims: this run's rows only, in a folder of its own under ./data; a
    reading command that works here; no warning of ours. Returns the run's folder."""
    assert "embedded Redis-compatible server" in out
    assert out.count(": ok") == 2
    produced = int(re.search(r"produced (\d+) rows", out).group(1))
    folder = re.search(r"this run writes to (\S+)", out).group(1)
    assert Path(folder).parent == cwd / "data"
    assert list((Path(folder) / "demo_events_0").glob("*.parquet"))
    commands = [line.strip() for line in out.splitlines() if line.startswith("  /")]
    assert commands
    for command in commands:  # each prints the number of rows this run produced
        proc = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, command + proc.stderr
        assert int(proc.stdout) == produced, command
    # Celery's own warning about running as root (this machine) is not ours
    ours = [line for line in out.splitlines() if re.search("warn", line, re.I)
            and "superuser privileges" not in line and "_warn_or_raise_security" not in line]
    assert not ours, ours
    return folder


@pytest.mark.integration
def test_demo_runs_the_pipeline_from_a_clean_state_each_time(tmp_path):
    """`deltaflush demo` with nothing but the package: embedded Redis, worker, beat; a
    second run counts its own rows in a folder of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAFLUSH_")}
    env["PYTHONPATH"] = str(ROOT)
    deltaflush = str(Path(sys.executable).with_name("deltaflush"))
    first = check_demo_output(run_demo(deltaflush, tmp_path, env), tmp_path, env)
    out = run_demo(deltaflush, tmp_path, env)
    assert "duckdb" in out and "polars" in out  # installed here, so offered
    second = check_demo_output(out, tmp_path, env)
    assert first != second and Path(first).exists()


def test_make_demo_installs_the_package_alone(tmp_path):
    """`make demo` must not install the test extra (1.2 GB where the package is 233 MB)."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # not nested

    def dry_run(target: str) -> list[str]:
        return subprocess.run(["make", "--no-print-directory", "-n", target], cwd=tmp_path,
                              env=env, capture_output=True, text=True, check=True
                              ).stdout.splitlines()

    demo = dry_run("demo")
    assert ".venv/bin/pip install -q -e ." in demo and not [c for c in demo if "[test]" in c]
    assert demo[-1] == ".venv/bin/deltaflush demo"
    assert ".venv/bin/pip install -q -e '.[test]'" in dry_run("test")


def test_redbeat_gets_no_fallback_of_ours_to_warn_about(caplog):
    """RedBeat warned at every beat start: our broker_transport_options, no
    redbeat_redis_options."""
    from redbeat.schedulers import RedBeatConfig

    from workers.app import make_app

    app = make_app(Settings())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RedBeatConfig(app)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


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
