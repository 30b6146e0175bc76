"""``deltaflush sql``: DuckDB queries over snapshots of both tiers, printed by the CLI."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from producer import Producer, Settings
from tests.conftest import id_batch
from workers.cli import main
from workers.flusher import Flusher
from workers.storage import Storage


@pytest.fixture
def cli_env(redis_server, real_redis, storage_dir):
    return {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir)}


def run(env, *args):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def two_tiers(real_redis, storage_dir):
    """``events``: ids 0..9 in the lake, 10..14 in the delta; ``clicks`` in the delta."""
    settings = Settings(storage_uri=str(storage_dir))
    p = Producer(client=real_redis, settings=settings)
    p.append("events", id_batch(0, 10))
    Flusher(real_redis, Storage(str(storage_dir)), settings).flush("events")
    p.append("events", id_batch(10, 5))
    p.append("clicks", id_batch(3, 4))
    return p


def test_a_query_sees_the_lake_and_the_delta(cli_env, two_tiers):
    out = run(cli_env, "sql", "SELECT count(*) AS n, sum(id) AS total FROM events")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["n", "total"]
    assert lines[2].split() == ["15", str(sum(range(15)))]


def test_json_joins_and_self_joins(cli_env, two_tiers):
    out = run(cli_env, "sql", "--json",
              "SELECT e.id, c.name FROM events e JOIN Clicks c USING (id) "
              "WHERE e.id IN (SELECT id FROM events WHERE value >= 1) ORDER BY e.id")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == [{"id": i, "name": f"x{i}"} for i in (4, 5, 6)]


@pytest.mark.parametrize("query,message", [
    ("SELECT * FROM evnts", "evnts"),
    ("SELEC 1", "DuckDB"),
    ("SELECT nope FROM events", "nope"),
])
def test_bad_queries_are_one_line_and_exit_2(cli_env, two_tiers, query, message):
    out = run(cli_env, "sql", query)
    assert out.exit_code == 2
    assert out.output.startswith("Error: ") and message in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_without_duckdb_it_says_what_to_install(cli_env, two_tiers, monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb raises ImportError
    out = run(cli_env, "sql", "SELECT 1")
    assert out.exit_code == 2
    assert "pip install duckdb" in out.output
