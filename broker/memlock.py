"""Will the consumer be able to register its UMEM? Decide before any socket is made.

The kernel charges every UMEM registration to the registering process's real uid
(user->locked_vm, summed over all of that uid's processes) and compares the sum with the
registering process's RLIMIT_MEMLOCK soft limit, unless it has CAP_IPC_LOCK. Past the limit
QEMU fails late and obscurely ("failed to create umem ...: No buffer space available"), after
the broker has already handed out sockets. So the broker checks the same sum up front: what
this lease needs plus what the uid already holds through live leases.

The broker cannot see locked memory that the uid holds by other means (io_uring buffers,
other AF_XDP users); the kernel still has the last word.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource

from broker import procinfo
from broker.errors import ConsumerGone, MemlockExceeded

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_RLIM_INFINITY = ctypes.c_ulong(-1).value
_FIX = (
    "raise LimitMEMLOCK= in the consumer's systemd unit, run `ulimit -l` before starting it, "
    "or grant it CAP_IPC_LOCK"
)


class _Rlimit(ctypes.Structure):
    _fields_ = (("rlim_cur", ctypes.c_ulong), ("rlim_max", ctypes.c_ulong))


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE)


def needed_bytes(queues: int, umem_bytes: int) -> int:
    """Bytes charged for queues UMEMs of umem_bytes each (the kernel counts whole pages)."""
    return queues * _pages(umem_bytes) * PAGE_SIZE


def mib(nbytes: int) -> str:
    """Bytes as a person reads them in an error message."""
    value = nbytes / (1024 * 1024)
    return f"{value:.0f} MiB" if value == int(value) else f"{value:.2f} MiB"


def check(
    consumer_pid: int, needed_bytes: int, held_bytes_for_uid: int, *, pidfd: int | None = None
) -> None:
    """Raise MemlockExceeded unless needed + held fits the consumer's RLIMIT_MEMLOCK.

    needed_bytes is this lease's UMEM total (see needed_bytes()), held_bytes_for_uid the UMEM
    of the live leases whose consumers run as the same real uid. A consumer with CAP_IPC_LOCK
    in its effective set always passes, as in the kernel, if it runs in the broker's user
    namespace (in one of its own, anyone has every capability). With the consumer's pidfd, a
    recycled pid is noticed (ConsumerGone) instead of checking a stranger.
    """
    soft = procinfo.memlock_limit(consumer_pid, pidfd).soft
    if soft is None or _pages(needed_bytes) + _pages(held_bytes_for_uid) <= soft // PAGE_SIZE:
        return
    # Only a shortfall needs the (costlier) status: CAP_IPC_LOCK, and the uid to name.
    status = procinfo.read_status(consumer_pid, pidfd)
    if status.has_cap(procinfo.CAP_IPC_LOCK) and procinfo.in_own_user_namespace(
        consumer_pid, pidfd
    ):
        return
    held = f" and uid {status.uid} already holds {mib(held_bytes_for_uid)} through other leases"
    raise MemlockExceeded(
        f"RLIMIT_MEMLOCK of pid {consumer_pid} (uid {status.uid}) is {mib(soft)}; "
        f"this lease needs {mib(needed_bytes)}{held if held_bytes_for_uid else ''}: {_FIX}",
        details={
            "consumer_pid": consumer_pid,
            "uid": status.uid,
            "limit_bytes": soft,
            "needed_bytes": needed_bytes,
            "held_bytes": held_bytes_for_uid,
        },
    )


def raise_limit(pid: int, total_bytes: int, *, pidfd: int | None = None) -> None:
    """Set pid's RLIMIT_MEMLOCK soft limit to total_bytes (and the hard one if it is lower).

    This is what libvirt does for QEMU. The kernel lets a process change another user's
    limits, or raise any hard limit, only with CAP_SYS_RESOURCE; when the broker lacks it the
    error says so rather than just "Operation not permitted".
    """
    current = procinfo.memlock_limit(pid, pidfd)
    hard = current.hard
    if hard is not None and hard < total_bytes:
        hard = total_bytes
    new = _Rlimit(total_bytes, _RLIM_INFINITY if hard is None else hard)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prlimit(pid, resource.RLIMIT_MEMLOCK, ctypes.byref(new), None) == 0:
        if pidfd is not None and procinfo.pidfd_exited(pidfd):
            raise ConsumerGone(f"process {pid} exited while its limit was being raised")
        return
    err = ctypes.get_errno()
    if err == errno.ESRCH:
        raise ConsumerGone(f"process {pid} does not exist (any more)")
    reason = os.strerror(err)
    if err == errno.EPERM and not procinfo.read_status(os.getpid()).has_cap(
        procinfo.CAP_SYS_RESOURCE
    ):
        reason = (
            "the broker lacks CAP_SYS_RESOURCE, which the kernel requires to change another "
            "user's limits or to raise a hard limit"
        )
    raise MemlockExceeded(
        f"cannot raise RLIMIT_MEMLOCK of pid {pid} to {mib(total_bytes)}: {reason}",
        errno=err,
        details={"consumer_pid": pid, "wanted_bytes": total_bytes},
    )


def ensure(
    consumer_pid: int,
    needed_bytes: int,
    held_bytes_for_uid: int,
    *,
    may_raise_to: int | None,
    pidfd: int | None = None,
) -> None:
    """check(), and where the policy allows it (may_raise_to: the most the broker may set the
    limit to, None: never), try raise_limit() once first.

    A raise beyond may_raise_to is refused before the limit is touched. A failed raise is
    reported together with the original shortfall, so the person reading it learns both
    what is missing and why the broker could not fix it itself.
    """
    try:
        check(consumer_pid, needed_bytes, held_bytes_for_uid, pidfd=pidfd)
    except MemlockExceeded as shortfall:
        if may_raise_to is None:
            raise
        total = (_pages(needed_bytes) + _pages(held_bytes_for_uid)) * PAGE_SIZE
        try:
            if total > may_raise_to:
                raise MemlockExceeded(
                    f"it would need {mib(total)}, beyond the {mib(may_raise_to)} that the "
                    "rule's max_umem_bytes_per_queue allows for the uid's queues"
                )
            raise_limit(consumer_pid, total, pidfd=pidfd)
        except MemlockExceeded as failure:
            raise MemlockExceeded(
                f"{shortfall.message} (the policy lets the broker raise the limit, but: "
                f"{failure.message})",
                errno=failure.errno,
                details=shortfall.details,
            ) from None
        check(consumer_pid, needed_bytes, held_bytes_for_uid, pidfd=pidfd)
