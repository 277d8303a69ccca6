"""The README's main job: `xsk-broker demo` works and leaves the machine as it found it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lab.brokerproc import REPO, wait_until

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


def _default_sigint() -> None:
    """A run started in the background by a non-interactive shell inherits SIGINT ignored,
    and Python then never turns it into KeyboardInterrupt: the demo must see the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def demo(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xsk_broker", "demo", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint, **kwargs,
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


def interrupt_demo() -> tuple[int, str, str]:
    """Start the demo, ^C it while its broker starts; (exit status, stderr, its lab line)."""
    proc = demo()
    assert proc.stdout is not None
    lab_line = proc.stdout.readline()
    assert all(Path(path).exists() for path in made_by(lab_line)), lab_line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err, lab_line


def test_interrupted_demo_removes_what_it_made() -> None:
    # The ^C lands while the broker's Popen forks: netlab.sigint_held() keeps CPython from
    # dropping it in an at-fork hook ("Exception ignored ... KeyboardInterrupt").
    status, err, lab_line = interrupt_demo()
    assert status == 130, err
    assert err.strip().endswith("INTERRUPTED: stopped by the user")
    assert leftovers(lab_line) == []
    # A broker caught mid-start is ended by its parent-death signal. This demo's broker is
    # the one with its bpffs in the command line: any demo's ("xskt-demo-") could be
    # another run's on the same machine.
    pins = made_by(lab_line)[-1]
    wait_until(lambda: subprocess.run(["pgrep", "-f", pins], capture_output=True).stdout == b"")
