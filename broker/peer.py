"""Who is on the other end of a connection, as the kernel says it: never the message."""

from __future__ import annotations

import errno
import socket
import struct

from broker.policy import Caller

SO_PEERGROUPS = 59
SO_PEERPIDFD = 77


def peer_of(conn: socket.socket) -> Caller:
    """Who is on the other end, as the kernel says (never the message), with a pidfd on it
    (SO_PEERPIDFD, Linux 6.5+) that the caller of this function owns."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
    except OSError as exc:  # ERANGE: more than 256 groups; NGROUPS_MAX is 65536
        if exc.errno != errno.ERANGE:
            raise
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 65536)
    groups = struct.unpack(f"{len(raw) // 4}I", raw)
    return Caller(uid, gid, groups, pid, conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
