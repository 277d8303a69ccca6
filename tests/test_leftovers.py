"""The end-of-run check that no process a test started outlives the suite (conftest)."""

from __future__ import annotations

import os
import subprocess

from conftest import SESSION_VARIABLE, left_running


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
