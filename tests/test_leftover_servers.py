"""No server outlives a killed pytest: a child pytest starts a long-running server through
tests/conftest.py's start_process_group (as every server fixture does), is sent SIGTERM or SIGINT
while the test runs, and the server's process group must be gone within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, start_process_group, stop_process_group

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads Linux /proc")]

# The child's only test: an HTTP server in a session of its own, then a long wait for the signal.
CHILD_TEST = '''
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import start_process_group
from tests.helpers import free_port, wait_healthy


def test_server_runs_until_pytest_is_killed():
    port = free_port()
    proc = start_process_group([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                str(port)], cwd=Path(__file__).parent,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}/", proc, timeout_s=30)
    (Path(__file__).parent / "server.pid").write_text(str(proc.pid))
    time.sleep(120)  # the parent test signals this pytest long before
'''


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while listed
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killed_pytest_stops_the_servers_it_started(tmp_path, signum):
    (tmp_path / "test_child.py").write_text(CHILD_TEST)
    pid_file = tmp_path / "server.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_ADDOPTS", None)
    # Its own group too, registered here: should this test fail, the child goes with it.
    child = start_process_group(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), str(tmp_path / "test_child.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert child.poll() is None, f"the child pytest ended early:\n{child.stdout.read()}"
            assert time.monotonic() < deadline, "the child's server never came up"
            time.sleep(0.1)
        server = int(pid_file.read_text())
        assert group_members(server), "the server is not running"
        child.send_signal(signum)
        out, _ = child.communicate(timeout=20)
        deadline = time.monotonic() + 5
        while group_members(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_members(server), f"the server outlived its pytest:\n{out[-3000:]}"
        if signum == signal.SIGTERM:
            assert child.returncode == -signal.SIGTERM  # it still dies of the signal
        else:
            assert child.returncode == 2 and "KeyboardInterrupt" in out, out[-3000:]
    finally:
        if server is not None and group_members(server):
            os.killpg(server, signal.SIGKILL)
        stop_process_group(child)
