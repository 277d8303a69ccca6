"""The end-of-run check that no process a test started outlives the suite (conftest)."""

from __future__ import annotations

import os
import signal
import subprocess

from conftest import SESSION_VARIABLE, kill_left_running, left_running


def test_a_process_of_this_run_left_running_is_found() -> None:
    ours = subprocess.Popen(["sleep", "61"])  # inherits the run's mark
    foreign = subprocess.Popen(["sleep", "62"], env={"PATH": os.environ["PATH"]})
    try:
        found = left_running()
        assert found[ours.pid] == "sleep 61"
        assert foreign.pid not in found
        assert os.getpid() not in found
        assert left_running(session=f"{os.environ[SESSION_VARIABLE]}0") == {}
    finally:
        for child in (ours, foreign):
            child.kill()
            child.wait()
    assert ours.pid not in left_running()


def test_a_process_of_another_run_with_this_runs_pid_is_not_found() -> None:
    """What a killed earlier run left, when this run got that run's pid, is not this run's."""
    env = {"PATH": os.environ["PATH"], SESSION_VARIABLE: str(os.getpid())}
    other = subprocess.Popen(["sleep", "64"], env=env)
    try:
        assert other.pid not in left_running()
    finally:
        other.kill()
        other.wait()


def test_a_listed_pid_now_of_another_process_is_not_killed() -> None:
    """The list is a moment old when the kill comes: a pid in it may by then be another
    process's (here one without the mark), which must survive; a marked one is killed."""
    ours = subprocess.Popen(["sleep", "63"])
    foreign = subprocess.Popen(["sleep", "65"], env={"PATH": os.environ["PATH"]})
    try:
        assert kill_left_running([foreign.pid, ours.pid]) == {ours.pid: "sleep 63"}
        assert ours.wait(timeout=10) == -signal.SIGKILL
        assert foreign.poll() is None
    finally:
        for child in (ours, foreign):
            child.kill()
            child.wait()
