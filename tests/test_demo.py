"""The README's main job: `xsk-broker demo` works and leaves the machine as it found it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.labbroker import REPO

pytestmark = pytest.mark.kernel


def lab_state() -> set[str]:
    return (
        {p.name for p in Path("/run/netns").glob("xskt-*")}
        if Path("/run/netns").exists()
        else set()
    )


def demo(*args: str, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "client.cli", "demo", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def test_demo_moves_frames_on_every_queue_and_cleans_up() -> None:
    before = lab_state()
    proc = demo("--json")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["ok"] and result["mode"] == "native"
    assert [q["received"] for q in result["per_queue"]] == [16, 16, 16, 16]
    assert result["replies_seen"] == 64
    assert result["broker_caps"] == "0000008000003000"
    assert lab_state() == before


def test_interrupted_demo_removes_what_it_made() -> None:
    before = lab_state()
    proc = demo()
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("lab: veth")
    proc.send_signal(signal.SIGINT)  # while the broker is still starting (~200 ms)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert lab_state() == before
    brokers = subprocess.run(["pgrep", "-f", "xskt-demo-"], capture_output=True, text=True)
    assert brokers.stdout == "", "a demo broker survived the interrupt"
