"""One broker per directory: an exclusive lock on the state directory and the pin
directories, held for the broker's whole life.

Two brokers on one state directory append to one lease journal, and a starting broker
removes the map leases' sockets, pins and steered slots that its own journal does not name:
a second broker there (on another socket) would break the first one's live leases. So each
directory holds a lock entry the broker flock()s before it adopts, replays or prunes
anything there; a second broker is refused at start and changes nothing. The kernel drops
the lock when its holder exits, however it exits (SIGKILL too), so a restart never waits.

The entry is a directory named `lock`, mode 0700: bpffs takes no regular file and no name
with a dot, and a lock others could open for reading (the state directory is 0755) they
could hold themselves, keeping the broker from starting. The entry stays between lives:
removing it while held would let a third broker lock a new one beside the second's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from broker import trust
from broker.errors import Refused

LOCK_NAME = "lock"
_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirectoryInUse(Refused):
    """Another broker holds the directory's lock."""

    code = "DIRECTORY_IN_USE"
    default_errno = errno.EBUSY


@dataclass
class DirectoryLocks:
    """The locks this broker holds, by directory; closing their fds drops them."""

    held: dict[Path, int] = field(default_factory=dict)

    def take(self, what: str, flag: str, directory: Path, *, create: bool = True) -> None:
        """Hold directory's lock (once; again is a no-op), or raise DirectoryInUse naming
        the holder's pid where /proc/locks shows it. With create False only a lock entry
        that exists is taken: a start refused later must have made nothing."""
        if directory in self.held:
            return
        entry = directory / LOCK_NAME
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(entry, 0o700)
        try:
            fd = os.open(entry, _OPEN)
        except FileNotFoundError:
            if create:
                raise
            return
        except OSError as exc:  # a link or a file where the entry should be
            raise trust.UntrustedPath(
                f"{what}: {entry} is not a directory the broker made: {exc.strerror}; remove it",
                errno=exc.errno,
            ) from None
        try:
            _check(what, entry, fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_pid(os.fstat(fd))
            os.close(fd)
            by = f" (pid {holder})" if holder else ""
            raise DirectoryInUse(
                f"{what} {directory} is in use by another broker{by}: stop that broker first, "
                f"or give this one its own {flag}",
                details={"path": str(directory), "pid": holder},
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self.held[directory] = fd

    def close(self) -> None:
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()


def _check(what: str, entry: Path, fd: int) -> None:
    """Refuse an entry another uid owns; one others could open is made 0700 again."""
    info = os.fstat(fd)
    if info.st_uid not in trust.trusted_uids():
        raise trust.refusal(what, entry, info, "not owned by root or the broker's uid")
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o700)


def holder_pid(info: os.stat_result) -> int | None:
    """The pid holding the flock on the file info describes, from /proc/locks ("1: FLOCK
    ADVISORY WRITE 4242 00:28:2004653 0 EOF", the device in hex); None when it does not
    show (0: a pid outside this pid namespace)."""
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with contextlib.suppress(OSError), open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted:
                pid = int(fields[4])
                return pid or None
    return None
