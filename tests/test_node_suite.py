"""The reference producer's own test suite (``clients/node/test``: the canonical form byte for
byte, shaping, and appends against a real redis-server it starts), run by ``make test`` as
part of this suite. Skipped until ``clients/node`` has its ``node_modules``; never skipped
with ``DELTAFLUSH_REQUIRE_NODE=1``, as in CI (``.ci/run`` runs ``npm ci`` first)."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

NODE = ROOT / "clients" / "node"
READY = ((NODE / "node_modules").is_dir() and shutil.which("npm") is not None) or \
    os.environ.get("DELTAFLUSH_REQUIRE_NODE") == "1"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not READY, reason="npm ci in clients/node first")]


def test_the_node_producers_own_suite_passes():
    proc = subprocess.run(["npm", "test"], cwd=NODE, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
