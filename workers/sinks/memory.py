"""An in-memory sink, for fast protocol tests (as dramatiq ships a stub broker).

It keeps each committed range's rows in a dict, keyed by table and range; committing a
range it holds already is a no-op, like every sink. ``table(name)`` is everything committed
to a table, in commit order.
"""

from __future__ import annotations

import threading

import pyarrow as pa

from producer import wire
from workers.sources import Range

from . import Committed, Staged, StagedFile, StageStart


class MemoryStaging:
    def __init__(self, sink: MemorySink, start: StageStart) -> None:
        self.sink = sink
        self.start = start
        self.parts: list[pa.Table] = []
        self.rows = 0
        self.arrow_bytes = 0

    def write(self, data: pa.Table) -> None:
        self.parts.append(data)
        self.rows += data.num_rows
        self.arrow_bytes += data.nbytes

    def seal(self) -> None:
        pass

    def close(self, rng: Range) -> Staged:
        key = f"memory://{rng.table}/{rng.first}_{rng.last}/{self.start.token}"
        with self.sink.lock:
            self.sink.staged[key] = pa.concat_tables(self.parts) if self.parts else None
        return Staged(rng, (StagedFile(temp=key, final=f"memory://{rng.table}/{rng.first}_"
                                       f"{rng.last}", partition="", size=self.arrow_bytes,
                                       rows=self.rows),) if self.parts else (),
                      self.arrow_bytes)

    def abort(self) -> None:
        self.parts.clear()


class MemorySink:
    """See the module doc. Thread-safe."""

    format = "memory"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.staged: dict[str, pa.Table | None] = {}
        #: table -> [(range, rows)], in commit order
        self.committed: dict[str, list[tuple[Range, pa.Table | None]]] = {}

    def stage(self, start: StageStart) -> MemoryStaging:
        return MemoryStaging(self, start)

    def commit(self, staged: Staged) -> Committed:
        rng = staged.range
        with self.lock:
            done = self.committed.setdefault(rng.table, [])
            if any((r.stream, r.first, r.last) == (rng.stream, rng.first, rng.last)
                   for r, _ in done):
                for f in staged.files:
                    self.staged.pop(f.temp, None)
                return Committed(already=True)
            rows = None
            for f in staged.files:
                rows = self.staged.pop(f.temp)
            done.append((rng, rows))
            return Committed(tuple(f.final for f in staged.files))

    def discard(self, staged: Staged) -> None:
        with self.lock:
            for f in staged.files:
                self.staged.pop(f.temp, None)

    def last_committed(self, table: str, stream: str) -> str | None:
        with self.lock:
            lasts = [r.last for r, _ in self.committed.get(table, []) if r.stream == stream]
        return max(lasts, key=wire.parse_id) if lasts else None

    def table(self, name: str) -> pa.Table | None:
        """Every row committed to table ``name``, in commit order (None if none)."""
        with self.lock:
            parts = [rows for _, rows in self.committed.get(name, []) if rows is not None]
        return pa.concat_tables(parts, promote_options="default") if parts else None
