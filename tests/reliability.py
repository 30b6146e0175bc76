"""Check a table's Parquet output (or its lake table) for loss and duplication, and record
the outcome for the reliability report (docs/reliability.md, made by ``make reliability`` /
``make chaos``).

With ``DELTAFLUSH_RELIABILITY_LOG`` set, every check appends one JSON line: the fault, the
test, the rows appended and the rows lost and duplicated. ``DELTAFLUSH_CHAOS_SCALE``
multiplies the sizes and rounds of the fault tests.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.conftest import read_ids

SCALE = max(1, int(os.environ.get("DELTAFLUSH_CHAOS_SCALE", "1")))


def record(fault: str, test: str, rows: int, lost: int, duplicated: int) -> None:
    path = os.environ.get("DELTAFLUSH_RELIABILITY_LOG")
    if not path:
        return
    line = {"fault": fault, "test": test, "rows": rows, "lost": lost, "duplicated": duplicated}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def check(fault: str, root: Path | str, table: str, expected: Iterable[int],
          must_have: Iterable[int] | None = None) -> None:
    """Assert every id of ``must_have`` (default: ``expected``) is in the table's files once,
    and no id outside ``expected`` or twice; record the outcome either way."""
    check_ids(fault, read_ids(root, table), expected, must_have,
              lambda missing: diagnose(root, table, missing))


def check_lake(fault: str, root: Path | str, table: str, expected: Iterable[int],
               must_have: Iterable[int] | None = None) -> None:
    """``check`` for a lake table (Iceberg in the default SQLite catalog of ``root``): its
    current snapshot read back by DuckDB's ``iceberg_scan``, an independent reader."""
    from tests.lake import duckdb_ids

    check_ids(f"iceberg: {fault}", duckdb_ids(root, table), expected, must_have,
              lambda missing: f"missing ids: {len(missing)}, from {min(missing)} to "
                              f"{max(missing)}")




def check_delta(fault: str, uri: Path | str, expected: Iterable[int],
                must_have: Iterable[int] | None = None) -> None:
    """``check`` for a Delta table at ``uri``, read by an independent reader (DuckDB's
    delta extension), not by the delta-rs library that wrote it; the fault is recorded as
    ``delta: <fault>``."""
    from tests.delta_readers import duckdb_ids, table_exists

    ids = duckdb_ids(uri) if table_exists(uri) else []
    check_ids(f"delta: {fault}", ids, expected, must_have, lambda missing: "")


def check_ids(fault: str, ids: list[int], expected: Iterable[int],
            must_have: Iterable[int] | None, diagnosis: Callable[[set[int]], str]) -> None:
    expected = set(expected)
    must = expected if must_have is None else set(must_have)
    counts = Counter(ids)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    lost = len(must - counts.keys())
    foreign = len(counts.keys() - expected)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    record(fault, test, len(must), lost, duplicated + foreign)
    assert duplicated == 0, f"{fault}: {duplicated} duplicated rows"
    assert foreign == 0, f"{fault}: {foreign} rows that were never appended"
    if lost:
        print(diagnosis(must - counts.keys()))
    assert lost == 0, f"{fault}: {lost} rows lost"


def refused(kind: str, rows: int, entries_written: int) -> None:
    """Record a bad input that must be refused with nothing written."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    record(f"bad input refused: {kind}", test, rows, 0, entries_written)
    assert entries_written == 0, f"{kind}: {entries_written} entries written"


def diagnose(root: Path | str, table: str, missing: set[int]) -> str:
    """What the files hold, to tell a lost range from a lost file."""
    import pyarrow.parquet as pq

    lines = [f"missing ids: {len(missing)}, from {min(missing)} to {max(missing)}"]
    for path in sorted(Path(root, table).rglob("*.parquet")):
        md = pq.read_metadata(path)
        kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
        ids = pq.read_table(path, columns=["id"])["id"].to_pylist()
        lines.append(f"{path.name}: rows={md.num_rows} ids={min(ids)}..{max(ids)} "
                     f"entries={kv.get('deltaflush.entries')}")
    return "\n".join(lines)
