"""The Prometheus exporter, scraped over HTTP like Prometheus does."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from producer import Producer, Settings
from producer.errors import Backpressure
from tests.conftest import free_port, id_batch
from workers.flusher import Flusher
from workers.metrics import serve
from workers.storage import Storage


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read()
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, sample.labels.get("table"), sample.labels.get("le"))] = \
                sample.value
    return out


def test_exporter_serves_lag_throughput_and_durations(real_redis, storage_dir):
    p = Producer(client=real_redis, settings=Settings(max_pending_bytes=3000))
    p.append("events", id_batch(0, 100))
    try:
        p.append("events", id_batch(100, 100))
    except Backpressure:
        pass
    port = free_port()
    server = serve(real_redis, "deltaflush", port, "127.0.0.1")
    try:
        m = scrape(port)
        assert m[("deltaflush_pending_rows", "events", None)] == 100
        assert m[("deltaflush_pending_bytes", "events", None)] > 0
        assert m[("deltaflush_oldest_pending_age_seconds", "events", None)] >= 0
        assert m[("deltaflush_backpressure_refusals_total", "events", None)] == 1
        Flusher(real_redis, Storage(str(storage_dir)), Settings()).flush("events")
        m = scrape(port)
        assert m[("deltaflush_pending_rows", "events", None)] == 0
        assert m[("deltaflush_rows_flushed_total", "events", None)] == 100
        assert m[("deltaflush_files_written_total", "events", None)] == 1
        assert m[("deltaflush_flush_duration_seconds_count", "events", None)] == 1
        assert m[("deltaflush_flush_duration_seconds_bucket", "events", "+Inf")] == 1
        assert m[("deltaflush_dead_letters", "events", None)] == 0
    finally:
        server.shutdown()
        server.server_close()
