"""Turn the JSON lines recorded by the fault tests into docs/reliability.md.

    DELTAFLUSH_RELIABILITY_LOG=run.jsonl pytest -m integration ...
    python -m bench.reliability run.jsonl "the command" > docs/reliability.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main() -> None:
    path, command = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    rows: dict[str, dict] = defaultdict(lambda: {"tries": 0, "rows": 0, "lost": 0,
                                                 "duplicated": 0, "tests": set()})
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            agg = rows[r["fault"]]
            agg["tries"] += 1
            agg["rows"] += r["rows"]
            agg["lost"] += r["lost"]
            agg["duplicated"] += r["duplicated"]
            agg["tests"].add(r["test"].split("[")[0])
    print("# Reliability report\n")
    print("Every fault and bad input the test suite injects, how often, with how many rows, and")
    print("what was lost or duplicated. Each row is checked by reading every Parquet file back.")
    print(f"\nMade by: `{command}`\n")
    print("| fault | tries | rows | lost | duplicated | test |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fault in sorted(rows):
        a = rows[fault]
        tests = ", ".join(f"`{t}`" for t in sorted(a["tests"]))
        print(f"| {fault} | {a['tries']} | {a['rows']} | {a['lost']} | {a['duplicated']} "
              f"| {tests} |")
    notes = Path(__file__).resolve().parent.parent / "docs" / "reliability-notes.md"
    if notes.exists():
        print("\n" + notes.read_text().strip())


if __name__ == "__main__":
    main()
