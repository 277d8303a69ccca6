"""The locked-memory check against real consumer processes with real limits and capabilities.

Children run as otherwise unused uids with RLIMIT_MEMLOCK lowered in preexec, and one keeps
CAP_IPC_LOCK through the ambient set (setpriv), so /proc reads what the kernel enforces.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Callable

import pytest
from support import Spawn, pidfd_of_dead, wait_until

from broker import memlock, procinfo
from broker.errors import ConsumerGone, MemlockExceeded
from broker.protocol import QEMU_UMEM_BYTES

MIB = 1024 * 1024
UID = 61011
pytestmark = pytest.mark.kernel  # children as other uids, with CAP_IPC_LOCK


def _limit(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))


def test_8mib_consumer_is_refused_32mib_with_numbers_and_fix(spawn: Spawn) -> None:
    child = spawn(user=UID, group=UID, extra_groups=[], preexec_fn=_limit(8 * MIB, 8 * MIB))
    with pytest.raises(MemlockExceeded) as caught:
        memlock.check(child.pid, memlock.needed_bytes(1, QEMU_UMEM_BYTES), 0)
    message = caught.value.message
    for part in (f"pid {child.pid}", f"uid {UID}", "8 MiB", "32 MiB", "LimitMEMLOCK="):
        assert part in message
    assert "ulimit -l" in message and "CAP_IPC_LOCK" in message
    assert caught.value.details["limit_bytes"] == 8 * MIB


def test_small_declared_umem_fits(spawn: Spawn) -> None:
    child = spawn(user=UID, group=UID, extra_groups=[], preexec_fn=_limit(8 * MIB, 8 * MIB))
    memlock.check(child.pid, memlock.needed_bytes(2, 2 * MIB), 0)


def test_sum_over_the_uid_counts(spawn: Spawn) -> None:
    """Mirrors the kernel: with 8 MiB, 5 MiB held + 5 MiB more fails, + 3 MiB works."""
    child = spawn(user=UID, group=UID, extra_groups=[], preexec_fn=_limit(8 * MIB, 8 * MIB))
    with pytest.raises(MemlockExceeded, match="already holds 5 MiB through other leases"):
        memlock.check(child.pid, 5 * MIB, 5 * MIB)
    memlock.check(child.pid, 3 * MIB, 5 * MIB)


def test_cap_ipc_lock_bypasses_the_limit(spawn: Spawn) -> None:
    child = spawn(
        [
            "setpriv",
            f"--reuid={UID}",
            f"--regid={UID}",
            "--clear-groups",
            "--inh-caps=+ipc_lock",
            "--ambient-caps=+ipc_lock",
            "sleep",
            "600",
        ],
        preexec_fn=_limit(MIB, MIB),
    )
    _wait_until(child.pid, lambda status: status.uid == UID)
    assert procinfo.read_status(child.pid).has_cap(procinfo.CAP_IPC_LOCK)
    memlock.check(child.pid, memlock.needed_bytes(8, QEMU_UMEM_BYTES), 0)


def _wait_until(pid: int, ready: Callable[[procinfo.ProcStatus], bool]) -> None:
    """setpriv changes credentials after fork; wait until the exec'd sleep has them."""
    wait_until(lambda: ready(procinfo.read_status(pid)))


def _root_without_ipc_lock(spawn: Spawn, soft: int, hard: int) -> subprocess.Popen[bytes]:
    """A root consumer that, like a confined QEMU, lacks CAP_IPC_LOCK."""
    child = spawn(
        ["setpriv", "--bounding-set=-ipc_lock", "sleep", "600"], preexec_fn=_limit(soft, hard)
    )
    _wait_until(child.pid, lambda status: not status.has_cap(procinfo.CAP_IPC_LOCK))
    return child


def test_raise_limit_for_another_uid_names_the_missing_capability(spawn: Spawn) -> None:
    """Root on these machines lacks CAP_SYS_RESOURCE, so this is the real refusal."""
    if procinfo.read_status(os.getpid()).has_cap(procinfo.CAP_SYS_RESOURCE):
        pytest.skip("this broker holds CAP_SYS_RESOURCE, so prlimit would succeed")
    child = spawn(user=UID, group=UID, extra_groups=[], preexec_fn=_limit(8 * MIB, 8 * MIB))
    with pytest.raises(MemlockExceeded, match="lacks CAP_SYS_RESOURCE"):
        memlock.raise_limit(child.pid, 64 * MIB)
    with pytest.raises(MemlockExceeded) as caught:
        memlock.ensure(child.pid, QEMU_UMEM_BYTES, 0, may_raise_to=QEMU_UMEM_BYTES)
    assert "RLIMIT_MEMLOCK of pid" in caught.value.message
    assert "the policy lets the broker raise the limit" in caught.value.message
    assert "lacks CAP_SYS_RESOURCE" in caught.value.message


def test_raise_limit_within_the_hard_limit_works(spawn: Spawn) -> None:
    """Same uid and no hard-limit increase: the kernel allows it without CAP_SYS_RESOURCE."""
    child = _root_without_ipc_lock(spawn, 2 * MIB, 8 * MIB)
    with pytest.raises(MemlockExceeded):
        memlock.check(child.pid, 4 * MIB, 0)
    memlock.ensure(child.pid, 4 * MIB, 2 * MIB, may_raise_to=6 * MIB)
    assert procinfo.memlock_limit(child.pid).soft == 6 * MIB


def test_ensure_without_permission_to_raise_reports_the_shortfall(spawn: Spawn) -> None:
    child = _root_without_ipc_lock(spawn, 2 * MIB, 8 * MIB)
    with pytest.raises(MemlockExceeded, match="is 2 MiB; this lease needs 4 MiB"):
        memlock.ensure(child.pid, 4 * MIB, 0, may_raise_to=None)
    assert procinfo.memlock_limit(child.pid).soft == 2 * MIB


def test_gone_consumer(spawn: Spawn) -> None:
    child = spawn()
    with pidfd_of_dead(child) as pidfd:
        with pytest.raises(ConsumerGone):
            memlock.check(child.pid, MIB, 0)
        # A live process under a pid whose pidfd has exited is what a recycled pid looks like.
        with pytest.raises(ConsumerGone):
            procinfo.read_status(os.getpid(), pidfd)


def test_limit_is_the_same_through_prlimit_and_through_proc(spawn: Spawn) -> None:
    """Root reads a root child's limit with prlimit(); another uid's falls back to
    /proc/PID/limits (root here lacks CAP_SYS_RESOURCE). Both say what the file says."""
    if procinfo.read_status(os.getpid()).has_cap(procinfo.CAP_SYS_RESOURCE):
        pytest.skip("this process holds CAP_SYS_RESOURCE, so prlimit reads every uid's limit")
    same = spawn(preexec_fn=_limit(3 * MIB, 5 * MIB))
    other = spawn(user=UID, group=UID, extra_groups=[], preexec_fn=_limit(6 * MIB, 7 * MIB))
    with pytest.raises(PermissionError):
        resource.prlimit(other.pid, resource.RLIMIT_MEMLOCK)
    for child, soft, hard in ((same, 3 * MIB, 5 * MIB), (other, 6 * MIB, 7 * MIB)):
        with open(f"/proc/{child.pid}/limits") as limits:
            assert procinfo.parse_memlock(limits.read()) == procinfo.Limit(soft, hard)
        pidfd = os.pidfd_open(child.pid)
        try:
            assert procinfo.memlock_limit(child.pid, pidfd) == procinfo.Limit(soft, hard)
        finally:
            os.close(pidfd)
        with pidfd_of_dead(child) as pidfd, pytest.raises(ConsumerGone):
            procinfo.memlock_limit(child.pid, pidfd)


def test_pid_0_is_no_consumer_not_the_broker_itself(spawn: Spawn) -> None:
    """SO_PEERCRED says pid 0 for a caller outside the broker's pid namespace and those below
    it (a host client of a containerised broker); prlimit(0, ...) is the broker's own limit,
    which must be neither taken for the caller's nor raised for it."""
    own = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    child = spawn()  # alive, so its pidfd says nothing has exited
    pidfd = os.pidfd_open(child.pid)
    try:
        with pytest.raises(ConsumerGone):
            procinfo.memlock_limit(0, pidfd)
        with pytest.raises(ConsumerGone):
            memlock.raise_limit(0, 64 * MIB, pidfd=pidfd)
    finally:
        os.close(pidfd)
    assert resource.getrlimit(resource.RLIMIT_MEMLOCK) == own


def test_unlimited_and_page_rounding() -> None:
    """No process here may have an unlimited limit (no CAP_SYS_RESOURCE), so parse the text."""
    text = "Max locked memory         unlimited            unlimited            bytes\n"
    assert procinfo.parse_memlock(text) == procinfo.Limit(None, None)
    assert memlock.needed_bytes(3, 1) == 3 * memlock.PAGE_SIZE
    assert memlock.needed_bytes(4, QEMU_UMEM_BYTES) == 128 * MIB
