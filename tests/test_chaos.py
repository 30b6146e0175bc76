"""Randomised chaos: rounds of a producer appending while a worker with a random fault at a
random step of the flush protocol competes with a healthy worker. Every round is checked
for loss and duplication. ``DELTAFLUSH_CHAOS_SCALE`` (``make chaos``) adds rounds and rows."""

from __future__ import annotations

import os
import random
import threading

import pytest

from tests.conftest import id_batch, wait_for
from tests.reliability import SCALE, check
from tests.test_fleet import STEPS, wait_drained

pytestmark = pytest.mark.integration

ACTIONS = ["kill", "raise"]


def test_random_faults_while_appending(fleet, producer_for, real_redis, storage_dir, tmp_path):
    seed = int(os.environ.get("DELTAFLUSH_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (DELTAFLUSH_CHAOS_SEED={seed} replays it)")
    p = producer_for()
    fleet.worker()
    fleet.beat()
    for r in range(3 * SCALE):
        step, action = rng.choice(STEPS), rng.choice(ACTIONS)
        table = f"chaos_{r}"
        once = tmp_path / f"once-{r}"
        once.mkdir()
        fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"] = str(once)
        proc, _ = fleet.worker(failpoints=f"{step}={action}")
        batches = 40 * SCALE

        def produce(table: str = table, batches: int = batches) -> None:
            for i in range(batches):
                p.append(table, id_batch(i * 50, 50))

        thread = threading.Thread(target=produce)
        thread.start()
        thread.join()
        wait_drained(fleet, real_redis, batches * 50, table, timeout=120)
        check(f"random {action} at a random step while appending (chaos)", storage_dir, table,
              range(batches * 50))
        # The faulty worker goes away hard: one more fault. (A worker holding a retry's
        # countdown can take long to finish a warm shutdown; SIGTERM has its own test.)
        proc.kill()
        wait_for(lambda proc=proc: proc.poll() is not None, 30, "the faulty worker to stop")
