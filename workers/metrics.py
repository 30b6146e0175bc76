"""Prometheus metrics, served by ``deltaflush exporter`` (one small process per fleet).

Every scrape reads each table's state from Redis in pipelined round trips, so the numbers
are the fleet's, whichever worker did the work, and the exporter holds no state of its own.
Flush durations are kept as histogram buckets in ``{T}:stats`` by the workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from producer import shards

from .scheduler import iter_tables
from .status import table_status

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the flush duration histogram buckets.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def duration_fields(seconds: float) -> list[str]:
    """The fields of ``{T}:stats`` that one range's flush duration counts in (the commit
    script increments them, with ``dur_count`` and ``dur_sum``)."""
    return [f"dur_le_{bound:g}" for bound in DURATION_BUCKETS if seconds <= bound]


class DeltaflushCollector(Collector):
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        tables = sorted(iter_tables(self.client, self.prefix))
        rows = table_status(self.client, self.prefix, tables)
        sharded = shards.sharded_tables(self.client, self.prefix)
        streams = [k for name in tables for k in shards.all_shards(self.prefix, name, sharded)]
        pipe = self.client.pipeline(transaction=False)
        for k in streams:
            pipe.hgetall(k.stats)
        stats: dict[str, dict[bytes, float]] = {}
        for k, raw in zip(streams, pipe.execute(), strict=True):
            summed = stats.setdefault(k.table, {})  # a sharded table: its shards' summed
            for field, value in raw.items():
                try:
                    summed[field] = summed.get(field, 0) + float(value)
                except ValueError:
                    continue

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"deltaflush_{name}", doc, labels=["table"])

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"deltaflush_{name}", doc, labels=["table"])

        pending_rows = gauge("pending_rows", "Rows appended and not yet in Parquet.")
        pending_bytes = gauge("pending_bytes", "Arrow IPC bytes appended and not yet flushed.")
        pending_entries = gauge("pending_entries", "Entries in the table's delta stream.")
        oldest = gauge("oldest_pending_age_seconds",
                       "Age of the oldest pending entry (0 when nothing is pending).")
        flushing = gauge("flushing", "1 while a flush of the table holds its lease.")
        stuck = gauge("stuck", "1 while the table is stuck: its state broke the flush "
                      "protocol and no flush runs until `deltaflush table unstick`.")
        dead = gauge("dead_letters", "Entries in the table's dead-letter stream.")
        rows_total = counter("rows_flushed", "Rows written to Parquet.")
        bytes_total = counter("bytes_flushed", "Parquet bytes written.")
        files_total = counter("files_written", "Parquet files written.")
        refused = counter("backpressure_refusals", "Appends refused by backpressure.")
        lake_files = gauge("lake_files", "Data files in a lake table's current snapshot.")
        lake_small = gauge("lake_small_files", "Data files under half the size target in a "
                           "lake table's current snapshot (compaction rewrites them).")
        lake_counters = [(counter(name, doc), field) for name, doc, field in (
            ("lake_commits", "Lake commits (snapshots) made by flushes.", "lake_commits"),
            ("lake_commit_conflicts", "Lake commits that met another commit and were "
             "retried by looking at the table again.", "lake_conflicts"),
            ("lake_ranges_already_committed", "Ranges a flush found the lake table held "
             "already (a retry after a crash, or a zombie): nothing committed twice.",
             "lake_already"),
            ("lake_compactions", "Compactions of a lake table.", "lake_compactions"),
            ("lake_files_compacted", "Data files rewritten by compactions.",
             "lake_files_compacted"),
            ("lake_snapshots_expired", "Snapshots expired.", "lake_snapshots_expired"),
            ("lake_orphans_removed", "Orphan files removed.", "lake_orphans_removed"))]
        durations = HistogramMetricFamily("deltaflush_flush_duration_seconds",
                                          "Seconds from reading one file's range to committing it "
                                          "(a range is read while the one before commits).",
                                          labels=["table"])
        shard_labels = ["table", "shard"]
        shard_pending = GaugeMetricFamily(
            "deltaflush_shard_pending_rows", "Rows pending in one shard of a sharded table.",
            labels=shard_labels)
        shard_rows = CounterMetricFamily(
            "deltaflush_shard_rows_flushed", "Rows flushed from one shard of a sharded table.",
            labels=shard_labels)
        shard_flushing = GaugeMetricFamily(
            "deltaflush_shard_flushing", "1 while a flush of the shard holds its lease.",
            labels=shard_labels)
        for s in rows:
            for part in s.shards or []:
                labels = [s.table, str(part.shard)]
                shard_pending.add_metric(labels, part.pending_rows)
                shard_rows.add_metric(labels, part.rows_flushed)
                shard_flushing.add_metric(labels, 1 if part.flushing else 0)
        for s in rows:
            t = [s.table]
            pending_rows.add_metric(t, s.pending_rows)
            pending_bytes.add_metric(t, s.pending_bytes)
            pending_entries.add_metric(t, s.pending_entries)
            oldest.add_metric(t, s.oldest_pending_age_s or 0.0)
            flushing.add_metric(t, 1 if s.flushing else 0)
            stuck.add_metric(t, 1 if s.stuck is not None else 0)
            dead.add_metric(t, s.dead_entries)
            rows_total.add_metric(t, s.rows_flushed)
            bytes_total.add_metric(t, s.bytes_flushed)
            files_total.add_metric(t, s.files_flushed)
            st = stats.get(s.table, {})
            refused.add_metric(t, int(st.get(b"backpressure", 0)))
            if s.lake is not None:
                lake_files.add_metric(t, s.lake["files"])
                lake_small.add_metric(t, s.lake["small_files"])
                for family, field in lake_counters:
                    family.add_metric(t, int(st.get(field.encode(), 0)))
            buckets = [(f"{b:g}", int(st.get(f"dur_le_{b:g}".encode(), 0)))
                       for b in DURATION_BUCKETS]
            buckets.append(("+Inf", int(st.get(b"dur_count", 0))))
            durations.add_metric(t, buckets, float(st.get(b"dur_sum", 0.0)))
        yield from (pending_rows, pending_bytes, pending_entries, oldest, flushing, stuck, dead,
                    rows_total, bytes_total, files_total, refused, durations, lake_files,
                    lake_small, *(family for family, _ in lake_counters), shard_pending,
                    shard_rows, shard_flushing)


def serve(client: redis.Redis, prefix: str, port: int, addr: str = "0.0.0.0") -> Any:
    """Start the HTTP server in a thread; return it (``.shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(DeltaflushCollector(client, prefix))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
