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


def made_by(lab_line: str) -> list[str]:
    """The namespaces and the bpffs mount the demo names in its first line of output."""
    assert lab_line.startswith("lab: veth"), lab_line
    spaces = lab_line.split("namespaces ")[1].split(",")[0].split(" and ")
    bpffs = lab_line.rsplit("bpffs ", 1)[1].strip()
    return [f"/run/netns/{ns}" for ns in spaces] + [bpffs]


def leftovers(lab_line: str) -> list[str]:
    mounts = {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}
    return [path for path in made_by(lab_line) if Path(path).exists() or path in mounts]


def demo(*args: str, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "client.cli", "demo", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def test_demo_moves_frames_on_every_queue_and_cleans_up() -> None:
    proc = demo("--json")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["ok"] and result["mode"] == "native"
    assert [q["received"] for q in result["per_queue"]] == [16, 16, 16, 16]
    assert result["replies_seen"] == 64
    assert result["broker_caps"] == "0000008000003000"
    assert leftovers(err.splitlines()[0]) == []


def test_interrupted_demo_removes_what_it_made() -> None:
    proc = demo()
    assert proc.stdout is not None
    lab_line = proc.stdout.readline()
    assert all(Path(path).exists() for path in made_by(lab_line)), lab_line
    proc.send_signal(signal.SIGINT)  # while the broker is still starting (~200 ms)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert leftovers(lab_line) == []
    brokers = subprocess.run(["pgrep", "-f", "xskt-demo-"], capture_output=True, text=True)
    assert brokers.stdout == "", "a demo broker survived the interrupt"
