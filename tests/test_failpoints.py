"""The fault-injection points stop or kill at the exact step, whichever thread reaches it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for

# A thread other than the main one reaches the point, then records that it went on.
PROGRAM = """
import sys, threading, time
from workers.failpoints import failpoint

def step():
    failpoint("flush.published")
    open(sys.argv[1], "w").write("went on")

threading.Thread(target=step).start()
time.sleep(60)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("action", ["stop", "kill"])
def test_a_failpoint_reached_by_another_thread_halts_that_thread_at_once(tmp_path, action):
    after = tmp_path / "after"
    once = tmp_path / "once"
    once.mkdir()
    env = dict(os.environ, DELTAFLUSH_FAILPOINTS=f"flush.published={action}",
               DELTAFLUSH_FAILPOINT_ONCE_DIR=str(once))
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, str(after)], env=env,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        wait_for((once / "flush.published").exists, 30, "the failpoint to fire")
        if action == "stop":
            wait_for(lambda: _state(proc.pid) == "T", 30, "the process to stop")
            assert not after.exists()  # stopped before the next line of that thread
            proc.send_signal(signal.SIGCONT)
            wait_for(after.exists, 30, "the thread to go on after SIGCONT")
        else:
            assert proc.wait(30) == -signal.SIGKILL
            assert not after.exists()
    finally:
        proc.kill()
        proc.wait()
