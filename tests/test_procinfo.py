"""Start times by pidfd (procinfo.StartTimes): what /proc/PID/stat says, read once per
process where pidfds live on pidfs, and every time where they do not (Linux before 6.9)."""

from __future__ import annotations

import os
import sys

import pytest
from support import Spawn, pidfd_of_dead

from broker import procinfo
from broker.errors import ConsumerGone

pytestmark = pytest.mark.kernel  # real processes and their pidfds


def _kernel_has_pidfs() -> bool:
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 9) and sys.maxsize > 2**32


def test_pidfs_is_recognised_where_the_kernel_has_it() -> None:
    assert procinfo.pidfds_on_pidfs() == _kernel_has_pidfs()


@pytest.mark.parametrize("pidfs", [True, False], ids=["pidfs", "proc-only"])
def test_each_process_gets_its_own_start_time_and_an_exited_one_is_gone(
    spawn: Spawn, pidfs: bool
) -> None:
    if pidfs and not _kernel_has_pidfs():
        pytest.skip("pidfds are anonymous inodes on this kernel: nothing is remembered")
    times = procinfo.StartTimes(pidfs=pidfs)
    children = [spawn(), spawn()]
    pidfds = [os.pidfd_open(child.pid) for child in children]
    try:
        for _ in range(2):  # the second time from what was remembered, where pidfs is
            for child, pidfd in zip(children, pidfds, strict=True):
                assert times.of(child.pid, pidfd) == procinfo.start_time(child.pid)
        assert len(times.known) == (2 if pidfs else 0)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    with pidfd_of_dead(children[0]) as pidfd:
        if pidfs:
            assert os.fstat(pidfd).st_ino in times.known
        with pytest.raises(ConsumerGone):
            times.of(children[0].pid, pidfd)


def test_remembers_at_most_its_bound_oldest_first(spawn: Spawn) -> None:
    if not _kernel_has_pidfs():
        pytest.skip("pidfds are anonymous inodes on this kernel: nothing is remembered")
    times = procinfo.StartTimes(most=2)
    inodes = []
    for child in (spawn(), spawn(), spawn()):
        pidfd = os.pidfd_open(child.pid)
        try:
            times.of(child.pid, pidfd)
            inodes.append(os.fstat(pidfd).st_ino)
        finally:
            os.close(pidfd)
    assert list(times.known) == inodes[1:]
