"""The SQL catalog that parses each table metadata file once (``producer.sqlcatalog``): a
load after a commit of its own parses nothing, and what another process committed is seen
at once (its new location is parsed), and conflicts are found as before."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.serializers import FromInputFile

from producer.sqlcatalog import KEPT, SqlCatalog

ROWS = pa.table({"id": pa.array([1, 2, 3], pa.int64())})


@pytest.fixture
def parses(monkeypatch):
    """Counts the metadata files pyiceberg parses."""
    calls: list[str] = []
    parse = FromInputFile.table_metadata

    def counted(input_file, *args, **kwargs):
        calls.append(input_file.location)
        return parse(input_file, *args, **kwargs)

    monkeypatch.setattr(FromInputFile, "table_metadata", staticmethod(counted))
    return calls


def catalog(tmp_path) -> SqlCatalog:
    return SqlCatalog("deltaflush", uri=f"sqlite:///{tmp_path}/catalog.db",
                      warehouse=f"file://{tmp_path}/warehouse")


def test_a_load_after_its_own_commit_parses_nothing(tmp_path, parses):
    cat = catalog(tmp_path)
    cat.create_namespace("ns")
    cat.create_table(("ns", "t"), ROWS.schema)
    cat.load_table(("ns", "t"))
    parses.clear()
    table = cat.load_table(("ns", "t"))  # the same location: remembered
    table.append(ROWS)  # commit_table loads the table again: remembered too
    again = cat.load_table(("ns", "t"))  # the location the commit wrote: remembered
    assert parses == []
    assert again.metadata_location == table.metadata_location
    assert again.scan().to_arrow().num_rows == 3


def test_what_another_process_committed_is_seen_and_conflicts_are_found(tmp_path, parses):
    mine, theirs = catalog(tmp_path), catalog(tmp_path)
    mine.create_namespace("ns")
    mine.create_table(("ns", "t"), ROWS.schema,
                      properties={"commit.retry.num-retries": "0"})  # as deltaflush's tables
    stale = mine.load_table(("ns", "t"))
    theirs.load_table(("ns", "t")).append(ROWS)
    parses.clear()
    fresh = mine.load_table(("ns", "t"))
    assert len(parses) == 1  # a new location: parsed
    assert fresh.scan().to_arrow().num_rows == 3
    with pytest.raises(CommitFailedException):
        stale.append(ROWS)  # based on what the other process replaced
    assert mine.load_table(("ns", "t")).scan().to_arrow().num_rows == 3


def test_it_keeps_a_bounded_number_of_files(tmp_path):
    cat = catalog(tmp_path)
    cat.create_namespace("ns")
    cat.create_table(("ns", "t"), ROWS.schema)
    for _ in range(KEPT + 4):
        cat.load_table(("ns", "t")).append(ROWS)
    assert len(cat._parsed) == KEPT
