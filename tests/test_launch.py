"""How tritonserver is launched: in its own session, and gone when the process that launched it
dies, both with util-linux's setpriv (the usual path: no fork of the parent) and with the
``preexec_fn`` fallback used where setpriv is missing; and how a start that ended early is described."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving_helpers import process_state

from ascl.serving.online.server import TritonServer, die_with_parent_prefix, exit_status

LAUNCHER = """
import sys, time
from ascl.serving.online import server
if sys.argv[1] == "fallback":
    server.die_with_parent_prefix = lambda: ()
child = server.launch(["sleep", "300"])
print(child.pid, flush=True)
time.sleep(300)
"""


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for a reaper counts as exited)."""
    return process_state(pid) in (None, "Z", "X")


@pytest.mark.parametrize("way", ["setpriv", "fallback"])
def test_a_launched_process_dies_with_its_launcher(way: str) -> None:
    if way == "setpriv" and not die_with_parent_prefix():
        pytest.skip("util-linux setpriv with --pdeathsig is not installed here")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, way], stdout=subprocess.PIPE, text=True)
    child = -1
    try:
        assert launcher.stdout is not None
        child = int(launcher.stdout.readline())
        assert not gone(child)
        assert os.getsid(child) == child, "launched into a session of its own"
        launcher.kill()  # SIGKILL: the launcher cleans nothing up itself
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(child), "the launched process outlived its launcher"
    finally:
        launcher.kill()
        if child > 0 and not gone(child):
            os.kill(child, signal.SIGKILL)


def test_setpriv_prefix_runs_the_command_itself() -> None:
    """The prefix execs the command in place: the pid Popen reports is the server's own."""
    prefix = die_with_parent_prefix()
    if not prefix:
        pytest.skip("util-linux setpriv with --pdeathsig is not installed here")
    proc = subprocess.Popen([*prefix, "sleep", "5"])
    try:
        time.sleep(0.3)
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep"
    finally:
        proc.kill()
        proc.wait()


def test_a_signal_is_named_in_the_exit_status() -> None:
    assert exit_status(-11) == "killed by SIGSEGV"
    assert exit_status(-9) == "killed by SIGKILL"
    assert exit_status(1) == "code 1"
    assert exit_status(None) == "code None"


def test_a_log_without_errors_is_not_pointed_at(tmp_path: Path) -> None:
    """A server that died before it logged anything must not say "see the errors above"."""
    log = tmp_path / "triton.log"
    log.write_text("I1203 starting\n")
    quiet = TritonServer(tmp_path, log_path=log).failure_report()
    assert "see the errors above" not in quiet and "no error line" in quiet
    log.write_text("I1203 starting\nE1203 model.py:12] something broke\n")
    loud = TritonServer(tmp_path, log_path=log).failure_report()
    assert loud.splitlines() == ["E1203 model.py:12] something broke", "see the errors above"]
