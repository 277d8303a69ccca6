"""How the broker meets its service manager: socket activation, sd_notify and the fd store.

Socket activation lets systemd own the listening socket, so it exists (with the right mode
and group) before the broker runs, survives broker restarts, and queues connections while
the broker starts. Started by hand, the broker binds the path itself instead. Under systemd
the broker reports READY/STATUS/WATCHDOG/STOPPING and can park file descriptors in the
service's fd store; outside systemd all of that is silently skipped.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from broker import trust
from broker.errors import Failed
from systemd import daemon

log = logging.getLogger("xsk-broker")
_TYPE_NAMES = {
    socket.SOCK_STREAM: "SOCK_STREAM",
    socket.SOCK_DGRAM: "SOCK_DGRAM",
    socket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
}


class ActivationError(Failed):
    """The socket handed over by the service manager, or the socket path, is unusable."""

    code = "ACTIVATION"
    default_errno = errno.EINVAL


def inherited_fds() -> list[tuple[str, int]]:
    """The fds systemd passed (LISTEN_FDS) as (FDNAME, fd), unsetting LISTEN_* for children.

    Besides the socket unit's listener these include whatever the previous broker parked in
    the fd store (FDSTORE=1), under the names it gave them. Call it once, at start.
    """
    fds: dict[int, str] = daemon.listen_fds_with_names()  # systemd-python: fd -> FDNAME
    # libsystemd unsets them in C; os.environ (what subprocess passes on) keeps its copy.
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return sorted((name, fd) for fd, name in fds.items())


def _describe(sock: socket.socket) -> str:
    kind = _TYPE_NAMES.get(sock.type, str(int(sock.type)))
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    return f"{sock.family.name} {kind}{', listening' if listening else ', not listening'}"


def _inherited_listener(inherited: Sequence[tuple[str, int]]) -> socket.socket | None:
    """The one listening socket among inherited, checked to be AF_UNIX SOCK_SEQPACKET."""
    listeners = []
    for name, fd in inherited:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            continue
        sock = socket.socket(fileno=fd)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listeners.append((name, sock))
        else:
            sock.detach()
    if not listeners:
        return None
    name, sock = listeners[0]
    if len(listeners) > 1 or sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        found = "; ".join(f"fd {s.fileno()} ({n}): {_describe(s)}" for n, s in listeners)
        for _, other in listeners:
            other.detach()
        raise ActivationError(
            f"socket activation passed {found}; xsk-broker needs exactly one listening "
            f"AF_UNIX SOCK_SEQPACKET socket: use ListenSequentialPacket= in xsk-broker.socket"
        )
    sock.set_inheritable(False)
    return sock


def gid_of(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ActivationError(f"group {group!r} does not exist (see sysusers.d)") from None


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse anything else at that path."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
            return
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:
                raise
    raise ActivationError(f"another process is listening on {path}; is a broker running?")


def _bind(path: Path, mode: int, group: str | int | None) -> socket.socket:
    """Bind path in a directory only root or the broker can write (broker.trust), so nobody
    can put their own socket there. The mode comes from the umask at bind(), and the group
    is set without following a link: nothing is done by path after bind() that a link
    swapped in could redirect."""
    gid = None if group is None else gid_of(group)
    trust.ensure_directory("socket directory", path.parent, 0o755)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        path.unlink()
        raise
    return sock


def listening_socket(
    path: str | Path,
    mode: int = 0o660,
    group: str | int | None = None,
    inherited: Sequence[tuple[str, int]] | None = None,
) -> socket.socket:
    """The broker's listening socket: systemd's if socket-activated, else bound at path.

    inherited is inherited_fds()'s result when the caller also wants the fd store's
    entries; by default it is read here. Inherited fds that are not listening sockets are
    left alone for the caller. mode and group apply only when binding here (the socket unit
    sets its own). Raises ActivationError when the inherited socket is of the wrong kind or
    the path is taken by a live listener or by something that is not a socket.
    """
    sock = _inherited_listener(inherited_fds() if inherited is None else inherited)
    return sock if sock is not None else _bind(Path(path), mode, group)


class Notifier:
    """sd_notify messages for a Type=notify service; no-ops when NOTIFY_SOCKET is unset.

    The watchdog is kicked from the server's own loop (watchdog() when convenient, and wake
    up at least every watchdog_interval seconds) so that a hung loop is what systemd sees.
    """

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        wanted = self.enabled and usec.isdigit() and pid in ("", str(os.getpid()))
        self.watchdog_interval: float | None = int(usec) / 2e6 if wanted else None
        self._last_kick = 0.0

    def _send(self, message: str, fds: Sequence[int] = ()) -> None:
        """Best effort: a status line or an fd-store entry that systemd did not take must
        not refuse a lease that is already granted (the journal still has it)."""
        if not self.enabled:
            return
        try:
            if fds:
                daemon.notify(message, fds=list(fds))
            else:
                daemon.notify(message)
        except OSError as exc:
            log.warning("sd_notify(%s) failed: %s", message.split("=", 1)[0], exc)

    def ready(self, status: str | None = None) -> None:
        """Tell systemd the broker is serving (ends `systemctl start`'s wait)."""
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        """The one line `systemctl status` shows, e.g. attachments and leases."""
        self._send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> None:
        self._send("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        """Send WATCHDOG=1 if half the watchdog timeout has passed since the last one."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_kick >= self.watchdog_interval:
            self._send("WATCHDOG=1")
            self._last_kick = now

    def store_fds(self, name: str, fds: Sequence[int]) -> None:
        """Park fds in the service's fd store; the next broker gets them in LISTEN_FDS."""
        self._send(f"FDSTORE=1\nFDNAME={name}", fds)

    def remove_fds(self, name: str) -> None:
        """Drop (and let systemd close) every stored fd named name."""
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")
