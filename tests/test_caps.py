"""The broker's start-up privilege handling, in real child processes with real credentials."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support import REPO, actor, run_captured

from broker import caps

NOBODY = 65534
THREE = {"net_admin", "bpf", "net_raw"}
# Root sets up the credentials; tests/conftest.py skips kernel tests without it.
pytestmark = pytest.mark.kernel


def run_child(prefix: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")}
    return run_captured([*prefix, *actor("least_privilege", *args)], env=env)


def setpriv(ambient: set[str], bounding: set[str] | None) -> list[str]:
    """Start as an ordinary uid holding exactly `ambient`, like the unit's AmbientCapabilities=."""
    plus = ",".join(f"+{name}" for name in sorted(ambient))
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv += [f"--inh-caps=-all,{plus}", f"--ambient-caps={plus}"]
    if bounding is not None:
        argv.append("--bounding-set=-all," + ",".join(f"+{name}" for name in sorted(bounding)))
    return argv


@pytest.mark.parametrize("bounded", [True, False], ids=["unit-like-bounding", "full-bounding"])
def test_non_root_with_three_ambient_caps_keeps_exactly_those(bounded: bool) -> None:
    done = run_child(setpriv(THREE, THREE if bounded else None))
    assert done.returncode == 0, done.stderr
    sets = json.loads(done.stdout)
    for key in ("CapPrm", "CapEff", "CapInh", "CapAmb"):
        assert set(sets[key]) <= THREE, key
    assert set(sets["CapPrm"]) == set(sets["CapEff"]) == THREE
    assert sets["nnp"] == "1"
    if bounded:
        assert set(sets["CapBnd"]) == THREE


@pytest.mark.parametrize("missing", sorted(THREE))
def test_one_missing_capability_exits_with_one_line_naming_it_and_the_fix(missing: str) -> None:
    done = run_child(setpriv(THREE - {missing}, None))
    assert done.returncode == 1
    message = done.stderr.strip()
    assert "\n" not in message
    assert message.startswith("MISSING_CAPABILITIES: missing capabilities ")
    assert caps.unit_name(missing) in message
    assert "AmbientCapabilities=" in message


def test_full_root_is_refused_without_allow_root() -> None:
    done = run_child([])
    assert done.returncode == 1
    assert done.stderr.startswith("ROOT_REFUSED: ")
    assert "--allow-root" in done.stderr


def test_full_root_with_allow_root_still_drops_everything_else_even_the_bounding_set() -> None:
    done = run_child([], "--allow-root")
    assert done.returncode == 0, done.stderr
    sets = json.loads(done.stdout)
    assert {k: set(v) for k, v in sets.items() if k != "nnp"} == {
        "CapPrm": THREE,
        "CapEff": THREE,
        "CapBnd": THREE,
        "CapInh": set(),
        "CapAmb": set(),
    }
    assert sets["nnp"] == "1"


def test_current_reads_another_process() -> None:
    sets = caps.current(Path("/proc/1/status"))
    assert set(sets) == set(caps.SETS)
