import json
import logging

import pytest

from tests.conftest import wait_for
from tests.test_fleet import TABLE, fill, wait_drained
from workers.logs import JsonFormatter


def test_json_formatter_writes_one_object_per_record():
    record = logging.LogRecord("workers.flusher", logging.INFO, __file__, 1,
                               "flushed table=%s rows=%d", ("events", 5), None)
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "flushed table=events rows=5"
    assert data["level"] == "INFO" and data["logger"] == "workers.flusher"


@pytest.mark.integration
def test_worker_logs_json_lines_with_one_line_per_flush(fleet, producer_for, real_redis):
    fleet.env["DELTAFLUSH_LOG_JSON"] = "1"
    p = producer_for()
    total = fill(p, batches=5)
    _, log = fleet.worker()
    p.flush(TABLE)
    wait_drained(fleet, real_redis, total)

    def flush_line():
        for line in log.read_text().splitlines():
            if line.startswith("{") and "flushed table=events" in line:
                return json.loads(line)
        return None

    line = wait_for(flush_line, 30, "the flush's log line")
    assert f"rows={total}" in line["message"] and "files=" in line["message"]
