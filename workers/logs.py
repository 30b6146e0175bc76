"""Log format for the entry points: plain lines, or JSON lines with ``DELTAFLUSH_LOG_JSON=1``.

Library modules only call ``logging.getLogger(__name__)``; the CLI and the Celery worker
(through Celery's ``setup_logging`` signal) configure handlers here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

PLAIN = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def json_logs() -> bool:
    return os.environ.get("DELTAFLUSH_LOG_JSON", "").lower() in ("1", "true", "yes")


def configure_logging(level: int | str = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs() else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
