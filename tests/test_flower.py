"""Flower, for real: `celery -A workers.app flower` with basic auth, flushes run by a real
worker, and their JSON summaries read back through Flower's API."""

import base64
import json
import urllib.error
import urllib.request

import pytest

from producer import Settings, wire
from tests.conftest import free_port, wait_for
from tests.test_fleet import TABLE, fill, wait_drained
from workers.app import make_app

pytestmark = pytest.mark.integration


def get(url, auth=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_flower_shows_flush_results_behind_auth(fleet, fleet_env, producer_for, real_redis):
    port = free_port()
    flower_log = fleet.logdir / "flower.log"
    proc = fleet.spawn(["flower", f"--port={port}", "--address=127.0.0.1",
                        "--basic-auth=ops:s3cret"], flower_log, fleet.env)
    fleet.procs.append((proc, flower_log))
    fleet.worker()
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            get(f"{base}/api/workers", "ops:s3cret")
            return True
        except (urllib.error.URLError, ConnectionError):
            return proc.poll() is not None

    wait_for(up, 60, "flower to answer")
    assert proc.poll() is None, flower_log.read_text()
    with pytest.raises(urllib.error.HTTPError) as denied:
        get(f"{base}/api/tasks")
    assert denied.value.code == 401

    # Flower learns of tasks only through events it captures from the moment its receiver is
    # subscribed; a worker it reports alive from events (not from inspect) proves that it is.
    def worker_seen_by_events():
        return any(get(f"{base}/api/workers?status=1", "ops:s3cret").values())

    wait_for(worker_seen_by_events, 60, "flower to receive the worker's events")

    p = producer_for()
    total = fill(p, batches=5)
    app = make_app(Settings.from_env(fleet_env))
    task_id = app.send_task(wire.FLUSH_TASK, args=[TABLE], queue=wire.QUEUE).id
    wait_drained(fleet, real_redis, total)

    def flushed():
        tasks = get(f"{base}/api/tasks?taskname=flush_table", "ops:s3cret")
        task = tasks.get(task_id)
        return task if task and task.get("state") == "SUCCESS" else None

    task = wait_for(flushed, 60, "flower to show the finished flush")
    assert task["name"] == "flush_table" and TABLE in task["args"]
    assert f"'rows': {total}" in task["result"] and "'files':" in task["result"]
    app.close()
