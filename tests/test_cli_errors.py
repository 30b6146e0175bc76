"""The ``deltaflush`` command tells the truth: one line per error naming the setting at
fault, non-zero exits, every table name checked, rich output on a terminal only."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from producer import Producer
from tests.conftest import free_port, id_batch
from workers.cli import main

DELTAFLUSH = str(Path(sys.executable).with_name("deltaflush"))


@pytest.fixture
def cli_env(redis_server, real_redis, storage_dir):
    return {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir)}


@pytest.fixture
def events(cli_env, redis_server):
    p = Producer(redis_url=redis_server.url)
    p.append("events", id_batch(0, 10))
    yield p
    p.close()


def invoke(env, *args):
    return CliRunner().invoke(main, list(args), env=env)


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    return lines[0]


EVERY_TABLE_COMMAND = [
    ["status", "{}"], ["flush", "{}"], ["flush", "{}", "--local"], ["table", "show", "{}"],
    ["table", "set", "{}", "--compression", "gzip"], ["dead", "list", "{}"],
    ["dead", "replay", "{}"],
]


@pytest.mark.parametrize("args", EVERY_TABLE_COMMAND, ids=lambda a: " ".join(a[:2]))
def test_every_command_refuses_an_unknown_table(cli_env, events, args):
    result = invoke(cli_env, *[a.format("evnets") for a in args])
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "unknown table 'evnets'" in line and "did you mean 'events'" in line


@pytest.mark.parametrize("args", EVERY_TABLE_COMMAND, ids=lambda a: " ".join(a[:2]))
def test_every_command_refuses_an_invalid_table_name(cli_env, args):
    result = invoke(cli_env, *[a.format("_deltaflush_tmp") for a in args])
    assert result.exit_code == 2
    assert "invalid table name '_deltaflush_tmp'" in one_line_error(result)


def test_table_set_create_configures_a_new_table(cli_env):
    result = invoke(cli_env, "table", "set", "fresh", "--create", "--compression", "gzip")
    assert result.exit_code == 0, result.output
    assert invoke(cli_env, "table", "show", "fresh").exit_code == 0


@pytest.mark.parametrize("args", [["status"], ["flush", "events"], ["table", "show", "events"],
                                  ["dead", "list", "events"], ["flush", "--all", "--local"]])
def test_an_unreachable_redis_is_one_line_naming_the_variable(cli_env, args):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = invoke(dict(cli_env, DELTAFLUSH_REDIS_URL=url), *args)
    assert result.exit_code == 1
    line = one_line_error(result)
    assert f"DELTAFLUSH_REDIS_URL=redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in line
    assert "hunter2" not in line and "onnect" in line  # what failed


def test_a_redis_url_that_is_not_one_names_the_variable(cli_env):
    result = invoke(dict(cli_env, DELTAFLUSH_REDIS_URL="localhost:6379"), "status")
    assert result.exit_code == 1
    assert "DELTAFLUSH_REDIS_URL=localhost:6379: not a Redis URL" in one_line_error(result)


def test_an_unreachable_broker_is_one_line_naming_the_variable(cli_env, events):
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    result = invoke(dict(cli_env, DELTAFLUSH_BROKER_URL=url), "flush", "events")
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "DELTAFLUSH_BROKER_URL=amqp://guest:***@127.0.0.1:" in line
    assert "cannot queue the flush" in line


def test_unwritable_storage_is_one_line_naming_the_variable(cli_env, events, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    env = dict(cli_env, DELTAFLUSH_STORAGE_URI=str(not_a_folder / "lake"))
    result = invoke(env, "flush", "events", "--local")
    assert result.exit_code == 1
    assert f"DELTAFLUSH_STORAGE_URI={not_a_folder}/lake" in one_line_error(result)


def console_script(env, *args):
    return subprocess.run([DELTAFLUSH, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_console_script_prints_one_line_and_a_traceback_only_with_debug(cli_env):
    env = {"PATH": "/usr/bin:/bin", **cli_env,
           "DELTAFLUSH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    plain = console_script(env, "status")
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith(
        "Error: DELTAFLUSH_REDIS_URL=redis://127.0.0.1:")
    assert "Traceback" not in plain.stderr
    debug = console_script(env, "--debug", "status")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_the_console_script_refuses_unknown_tables(cli_env):
    env = {"PATH": "/usr/bin:/bin", **cli_env}
    for args in (["flush", "nosuch"], ["table", "show", "nosuch"], ["dead", "list", "nosuch"],
                 ["status", "nosuch"]):
        proc = console_script(env, *args)
        assert proc.returncode == 2, args
        assert proc.stderr.strip() == "Error: unknown table 'nosuch': no batch was ever " \
            "appended to it; `deltaflush status` lists the tables", args


def test_rich_tables_on_a_terminal_plain_text_when_piped(cli_env, events):
    piped = invoke(cli_env, "status")
    assert "\x1b[" not in piped.output and piped.output.splitlines()[0].split()[:2] == [
        "table", "pending"]
    terminal = invoke(dict(cli_env, FORCE_COLOR="1", COLUMNS="160"), "status")
    assert terminal.exit_code == 0
    assert "\x1b[" in terminal.output and "┃" in terminal.output  # colour, a drawn table
    assert json.loads(invoke(cli_env, "status", "--json").output)[0]["table"] == "events"


def test_progress_bar_on_a_terminal_for_long_work(cli_env, events):
    events.append("clicks", id_batch(0, 5))
    result = invoke(dict(cli_env, FORCE_COLOR="1", COLUMNS="160"), "flush", "--all", "--local")
    assert result.exit_code == 0, result.output
    assert "━" in result.output and "15/15" in result.output  # rows flushed of rows pending
    assert "[2/2] events: ok, 10 rows" in result.output


def test_table_show_is_a_readable_table_with_reader_warnings(cli_env, events):
    events.configure("types", spark_compatible=False)
    events.append("types", pa.table({"id": [1], "opens": pa.array([1], pa.time64("us")),
                                     "at": pa.array([1], pa.timestamp("ns"))}))
    out = invoke(cli_env, "table", "show", "types")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "table types: 0 files flushed"
    assert lines[1].split() == ["setting", "value"]
    assert any(line.split()[:2] == ["compression", "zstd"] for line in lines)
    assert any(line.split()[:3] == ["spark_compatible", "False", ""] or
               line.split()[:2] == ["spark_compatible", "False"] for line in lines)
    assert "warning: opens (time64[us]): Spark before 4.1 reads no Parquet TIME" in out.output
    assert "warning: at (timestamp[ns]): Spark reads no nanosecond timestamps" in out.output
    default = invoke(cli_env, "table", "show", "events")
    assert "warning" not in default.output and "converted" not in default.output
    shown = json.loads(invoke(cli_env, "table", "show", "types", "--json").output)
    assert {w["column"] for w in shown["warnings"]} == {"opens", "at"}


def test_dead_list_json(cli_env, events, real_redis):
    real_redis.xadd("deltaflush:{events}:delta", {"arrow": b"garbage"})
    assert invoke(cli_env, "flush", "events", "--local").exit_code == 0
    data = json.loads(invoke(cli_env, "dead", "list", "events", "--json").output)
    assert data["total"] == 1 and "not a valid Arrow" in data["dead_letters"][0]["error"]


def test_doctor_reports_each_check_and_fails_on_an_unreachable_redis(cli_env):
    ok = invoke(cli_env, "doctor")
    assert ok.exit_code == 0, ok.output
    checks = {line.split()[0] for line in ok.output.splitlines()[2:]}
    assert {"redis", "broker", "storage"} <= checks
    assert "appendonly is off" in ok.output  # the test server runs without AOF: a warning
    bad = invoke(dict(cli_env, DELTAFLUSH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
                 "doctor", "--json")
    assert bad.exit_code == 1
    statuses = {c["name"]: c["status"] for c in json.loads(bad.output)}
    assert statuses["redis"] == "fail" and statuses["storage"] == "ok"
