"""One broker per directory (broker/dirlock.py): a second broker on its own socket but on
the first one's state directory, pin directory or map leases' pin directory (as its own
--pin-dir) is refused at start with one line naming the directory and the holder's pid,
and changes nothing there; the first one's map lease keeps its frames. Before the lock,
such a broker ended the first one's lease in the shared journal and removed its
device-plugin socket, or steered its queue back to the shared XSKMAP and removed its pin."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import veth_lab_fixture
from support import actor, pin_dir, run_captured
from test_dpdk import drop_box, lease_pin_dir, leases, map_lease_on, slots_of

from broker.dirlock import LOCK_NAME, DirectoryInUse, DirectoryLocks
from lab.brokerproc import BrokerProcess, public_tempdir, wait_until
from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID, VethLab, run_unprivileged
from lab.traffic import send_to_queue

lab4 = veth_lab_fixture(queues=4)


@pytest.fixture
def other_workdir() -> Iterator[Path]:
    """The second broker's own socket, state and pin directories live here."""
    path = public_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def held_by_first(broker: BrokerProcess, pin_root: Path, lab: VethLab) -> dict[str, object]:
    """What a second broker must not change: the journal, the device-plugin sockets, the
    lease pins, the slots of the map of maps, the live leases."""
    return {
        "journal": (broker.state_dir / "leases.jsonl").read_bytes(),
        "dp": sorted(p.name for p in (broker.state_dir / "dp").iterdir()),
        "pins": sorted(p.name for p in lease_pin_dir(pin_root).iterdir()),
        "slots": slots_of(pin_dir(lab, pin_root) / str(lab.a.ifindex) / "queues", 4),
        "leases": [lease.lease_id for lease in leases(broker)],
    }


def came_up(broker: BrokerProcess) -> bool:
    """Start broker, which should refuse; one that comes up instead is stopped at once."""
    try:
        broker.start()
    except RuntimeError:
        return False
    broker.stop()
    return True


@pytest.mark.kernel
@pytest.mark.parametrize("shared", ["state-dir", "pin-dir", "lease-pin-dir"])
def test_a_second_broker_on_the_first_ones_directory_is_refused_and_changes_nothing(
    lab4: VethLab, pin_root: Path, workdir: Path, other_workdir: Path, shared: str
) -> None:
    ifname = lab4.ifname_a
    own_pins = pin_root.with_name(pin_root.name + "-second")  # never made if refused
    second_pins = {"pin-dir": pin_root, "lease-pin-dir": lease_pin_dir(pin_root)}.get(
        shared, own_pins
    )
    state = ("--state-dir", str(workdir / "state")) if shared == "state-dir" else ()
    second = BrokerProcess(lab4.ns_a, second_pins, other_workdir, "--map-pins", *state)
    try:
        with BrokerProcess(lab4.ns_a, pin_root, workdir, "--map-pins") as first:
            ready, sent = drop_box(workdir) / "tenant", drop_box(workdir) / "sent"
            consumer = actor("map_tenant", "{dp-path}", ifname, "0", "0", str(ready), str(sent))
            tenant = map_lease_on(
                first, lab4, 0, consumer, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                wait_until(ready.exists, timeout=60)
                before = held_by_first(first, pin_root, lab4)
                started = came_up(second)
                refusal = second.log().splitlines()
                assert held_by_first(first, pin_root, lab4) == before
                assert send_to_queue(lab4.b, lab4.a, 0, "q=0", 30) == 30
                sent.touch()
                out, err = tenant.communicate(timeout=60)
            finally:
                tenant.kill()
                tenant.wait()
            assert tenant.returncode == 0, err
            assert json.loads(out)["received"] == 30
            assert not started and second.proc is not None and second.proc.returncode == 1
            assert not second.socket_path.exists() and not second.state_dir.exists()
            assert not own_pins.exists()
            first.kill()  # SIGKILL drops the lock with the process: the next broker starts
            second.start()
            assert second.client().status().broker.pid == second.pid
    finally:
        second.stop()
        for path in (own_pins, lease_pin_dir(second_pins)):
            shutil.rmtree(path, ignore_errors=True)
    directory, flag, what = {
        "state-dir": (workdir / "state", "--state-dir", "state directory"),
        "pin-dir": (pin_root, "--pin-dir", "pin directory"),
        "lease-pin-dir": (lease_pin_dir(pin_root), "--pin-dir", "pin directory"),
    }[shared]
    assert refusal == [
        f"DIRECTORY_IN_USE: {what} {directory} is in use by another broker (pid {first.pid}): "
        f"stop that broker first, or give this one its own {flag}"
    ]


def test_a_lock_is_refused_while_another_open_file_holds_it(tmp_path: Path) -> None:
    """flock() is per open file: a second holder in the same process is refused too, and
    named by pid; once the first is closed the lock can be taken again."""
    first, second = DirectoryLocks(), DirectoryLocks()
    first.take("state directory", "--state-dir", tmp_path)
    try:
        with pytest.raises(DirectoryInUse) as refused:
            second.take("state directory", "--state-dir", tmp_path)
        assert refused.value.errno == errno.EBUSY
        assert refused.value.details == {"path": str(tmp_path), "pid": os.getpid()}
    finally:
        first.close()
    second.take("state directory", "--state-dir", tmp_path)
    second.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_without_an_entry_nothing_is_made(tmp_path: Path) -> None:
    """The first pass, before the socket is bound, takes only an entry that exists."""
    locks = DirectoryLocks()
    locks.take("state directory", "--state-dir", tmp_path, create=False)
    assert locks.held == {} and list(tmp_path.iterdir()) == []


@pytest.mark.kernel
def test_another_uid_cannot_hold_the_lock_to_keep_the_broker_from_starting(
    workdir: Path,
) -> None:
    """The state directory is 0755 for the device-plugin sockets in it: a lock on the
    directory itself, any uid could take; the entry is 0700, so that uid cannot open it."""
    workdir.chmod(0o755)
    locks = DirectoryLocks()
    locks.take("state directory", "--state-dir", workdir)
    try:
        grab = (
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
        )
        done = run_unprivileged(
            ["python3", "-c", grab, str(workdir / LOCK_NAME)], UNPRIVILEGED_UID, UNPRIVILEGED_GID
        )
        assert done.returncode != 0 and "PermissionError" in done.stderr, done.stderr
    finally:
        locks.close()
    assert run_captured(["stat", "-c", "%a", str(workdir / LOCK_NAME)]).stdout.strip() == "700"
