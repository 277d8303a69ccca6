"""What a map lease hands out besides the lease itself: its own XSKMAP (core.py steers the
lease's queues through it), offered on a device-plugin socket (DPDK use_cni=1,dp_path=...)
served on the broker's loop and pinned in bpffs (DPDK use_pinned_map=1, QEMU map-path=),
for the consumer's uid alone. All three go with the lease.

The socket file is open to all (mode 0666 in a 0755 directory) because the answer, not
the file, is the gate: dpfront.py serves only the consumer's uid, as SO_PEERCRED says. A pin
has no such gate (BPF_OBJ_GET checks file permissions only), so it is owned by the consumer
uid with mode 0600, in a directory everyone may traverse but not list; changing a file's
owner takes CAP_CHOWN, which the broker keeps only with `serve --map-pins`; without it
no pin is made (dp_path only).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker import bpf, caps, trust
from broker.core import MapPaths
from broker.errors import AttachFailed, BadRequest
from broker.frontend import FrontEnd
from broker.protocol import validate_lease_id

log = logging.getLogger("xsk-broker")


@dataclass
class MapLeases:
    """Per-lease device-plugin sockets and pins; serve/unserve put a listening socket on the
    server's loop and take it off; front_end makes the front end for one lease id."""

    dp_dir: Path
    pin_dir: Path
    serve: Callable[[socket.socket, FrontEnd], None]
    unserve: Callable[[socket.socket], None]
    front_end: Callable[[str], FrontEnd]
    listeners: dict[str, socket.socket] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)

    def open(self, lease_id: str, consumer_uid: int, map_fd: int) -> MapPaths:
        """The socket and the pin for a new lease, whose map_fd this now owns; all or
        nothing."""
        self.maps[lease_id] = map_fd
        try:
            dp_path = self._listen(lease_id)
            pin = self._pin(lease_id, consumer_uid, map_fd)
        except BaseException:
            self.close(lease_id)
            raise
        return MapPaths(str(dp_path), pin)

    def map_fd(self, lease_id: str) -> int | None:
        """The lease's map (still this object's), if the lease is open here."""
        return self.maps.get(lease_id)

    def close(self, lease_id: str) -> None:
        """Take the lease's socket off the loop, remove its file and pin, close its map."""
        sock = self.listeners.pop(lease_id, None)
        if sock is not None:
            self.unserve(sock)
        map_fd = self.maps.pop(lease_id, None)
        if map_fd is not None:
            os.close(map_fd)
        for path in (self._socket_path(lease_id), self.pin_dir / lease_id):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def prune(self, live: set[str]) -> None:
        """At start: remove the sockets and pins an earlier broker left of leases not in
        live (ended while no broker ran, or never journaled), so none keeps its map."""
        for what, directory, suffix in (
            ("device-plugin socket directory", self.dp_dir, ".sock"),
            ("lease pin directory", self.pin_dir, ""),
        ):
            for name in _remove_stale(what, directory, suffix, live):
                log.info("removed %s: its lease is not live", directory / name)

    def _socket_path(self, lease_id: str) -> Path:
        return self.dp_dir / f"{lease_id}.sock"

    def _listen(self, lease_id: str) -> Path:
        trust.ensure_directory("device-plugin socket directory", self.dp_dir, 0o755)
        path = self._socket_path(lease_id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o666)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise AttachFailed(
                f"cannot make the device-plugin socket {path}: {exc.strerror}", errno=exc.errno
            ) from None
        self.listeners[lease_id] = sock
        self.serve(sock, self.front_end(lease_id))
        return path

    def _pin(self, lease_id: str, consumer_uid: int, map_fd: int) -> str:
        if not set(caps.MAP_PINS) <= caps.current()["CapEff"]:
            log.info("lease %s: no pinned map (serve --map-pins keeps CAP_CHOWN)", lease_id)
            return ""
        trust.ensure_directory("lease pin directory", self.pin_dir, 0o711)
        os.chmod(self.pin_dir, 0o711)  # the broker's own now; consumers traverse it
        _check_reachable(self.pin_dir)
        path = self.pin_dir / lease_id
        try:
            bpf.pin(map_fd, str(path))
            os.chmod(path, 0o600)  # before chown: after it, the broker is not the owner
            os.chown(path, consumer_uid, -1)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise AttachFailed(
                f"cannot pin the lease's XSKMAP at {path}: {exc.strerror}",
                errno=exc.errno or errno.EIO,
            ) from None
        return str(path)


def _check_reachable(directory: Path) -> None:
    """Refuse pins a consumer could not open: every directory on the way must let others
    through (systemd mounts /sys/fs/bpf mode 0700, so pins there reach root alone)."""
    for parent in (directory, *directory.parents):
        mode = stat.S_IMODE(parent.stat().st_mode)
        if not mode & stat.S_IXOTH:
            raise AttachFailed(
                f"consumers cannot reach pins in {directory}: {parent} has mode {mode:04o}; "
                f"let others through it (chmod o+x {parent}) or run without --map-pins",
                errno=errno.EACCES,
            )


def _remove_stale(what: str, directory: Path, suffix: str, live: set[str]) -> list[str]:
    """Unlink the files of directory named <lease id><suffix> but for live's, by name
    relative to the directory's fd; returns their names. Nothing when the directory is
    missing or untrusted (the next request on it refuses it)."""
    try:
        trust.check_directory(what, directory)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (trust.UntrustedPath, OSError):
        return []
    removed = []
    try:
        for name in os.listdir(fd):
            lease_id = name.removesuffix(suffix)
            if name.endswith(suffix) and _is_lease_id(lease_id) and lease_id not in live:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
                    removed.append(name)
    finally:
        os.close(fd)
    return removed


def _is_lease_id(name: str) -> bool:
    try:
        validate_lease_id(name)
    except BadRequest:
        return False
    return True
