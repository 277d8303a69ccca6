"""What the kernel says about another process, read from /proc.

Policy, polkit and the locked-memory check all need facts about a caller or consumer that
the process itself must not be able to state: its uids, effective capabilities, memlock
limit and start time. A pid alone can be reused between two reads; when the server holds a
pidfd for the process, pass it and the read is confirmed to be of that very process (the
pidfd turns readable when its process exits, so "still not readable after the read" means
the pid had not been recycled yet).
"""

from __future__ import annotations

import errno
import os
import resource
import select
from dataclasses import dataclass

from broker.errors import ConsumerGone

CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class ProcStatus:
    """The identity fields of /proc/PID/status."""

    pid: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    cap_eff: int
    # The pid in each pid namespace from the one /proc belongs to down to the process's own:
    # more entries than the broker's own means a pid namespace below the broker's.
    nspids: tuple[int, ...]

    @property
    def uid(self) -> int:
        """The real uid: the kernel charges locked memory (UMEM) to this user."""
        return self.uids[0]

    def has_cap(self, cap: int) -> bool:
        return bool(self.cap_eff >> cap & 1)


@dataclass(frozen=True)
class Limit:
    """One resource limit; None means unlimited."""

    soft: int | None
    hard: int | None


def _read(pid: int, name: str, pidfd: int | None) -> str:
    """One read of a /proc file (they are generated whole on the first read, and all that
    are read here fit in 4 KiB); plain os calls, a third of what open() costs per request."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 65536).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        raise _gone(pid) from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise _gone(pid) from None
        raise
    _check_same(pid, pidfd)
    return text


def _gone(pid: int) -> ConsumerGone:
    return ConsumerGone(f"process {pid} does not exist (any more)")


def _check_same(pid: int, pidfd: int | None) -> None:
    """After a read about pid: ConsumerGone if pidfd's process has exited meanwhile (the pid
    may name another process by now)."""
    if pidfd is not None and pidfd_exited(pidfd):
        raise ConsumerGone(f"process {pid} exited while the broker was reading about it")


def pidfd_exited(pidfd: int) -> bool:
    """True once the process behind pidfd has exited (the pidfd polls readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def read_status(pid: int, pidfd: int | None = None) -> ProcStatus:
    """Parse /proc/PID/status; ConsumerGone when the process is not there."""
    fields: dict[str, str] = {}
    for line in _read(pid, "status", pidfd).splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    try:
        uids = tuple(int(v) for v in fields["Uid"].split())
        gids = tuple(int(v) for v in fields["Gid"].split())
        groups = tuple(int(v) for v in fields["Groups"].split())
        cap_eff = int(fields["CapEff"], 16)
        nspids = tuple(int(v) for v in fields["NSpid"].split())
    except (KeyError, ValueError) as exc:
        raise ConsumerGone(f"/proc/{pid}/status is unreadable: {exc}") from None
    return ProcStatus(pid, uids, gids, groups, cap_eff, nspids)


def in_own_user_namespace(pid: int, pidfd: int | None = None) -> bool:
    """Whether pid runs in the broker's user namespace. /proc/PID/uid_map (readable by
    anyone) reads as the reader sees it, so the same text means the same namespace; any
    user can make a namespace of its own, where it has every capability, which the kernel
    does not count outside it."""
    return _read(pid, "uid_map", pidfd) == _read(os.getpid(), "uid_map", None)


def memlock_limit(pid: int, pidfd: int | None = None) -> Limit:
    """RLIMIT_MEMLOCK of pid: prlimit() where the kernel lets the broker read it (the same
    uids, or CAP_SYS_RESOURCE), one syscall instead of opening, generating and parsing all
    of /proc/PID/limits on every request; else that file, which anyone may read.

    pid 0, which SO_PEERCRED gives for a peer whose pid namespace is not below the broker's,
    is refused: to prlimit() it means the broker itself."""
    if pid <= 0:
        raise _gone(pid)
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)
    except PermissionError:  # EPERM, or EACCES from an LSM
        limit = parse_memlock(_read(pid, "limits", pidfd))
        if limit is None:
            raise ConsumerGone(f"/proc/{pid}/limits has no 'Max locked memory' line") from None
        return limit
    except ProcessLookupError:
        raise _gone(pid) from None
    _check_same(pid, pidfd)
    return Limit(_rlimit_value(soft), _rlimit_value(hard))


def parse_memlock(limits_text: str) -> Limit | None:
    """The 'Max locked memory' line of a /proc/PID/limits text, "unlimited" as None."""
    for line in limits_text.splitlines():
        if line.startswith("Max locked memory"):
            soft, hard = line[len("Max locked memory") :].split()[:2]
            return Limit(_limit_value(soft), _limit_value(hard))
    return None


def _limit_value(text: str) -> int | None:
    return None if text == "unlimited" else int(text)


def _rlimit_value(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def start_time(pid: int, pidfd: int | None = None) -> int:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the pid, it names one process.

    The command name (field 2) may contain spaces and parentheses, so fields are counted
    from the last ')'.
    """
    stat = _read(pid, "stat", pidfd)
    return int(stat[stat.rindex(")") + 2 :].split()[19])
