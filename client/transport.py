"""What the sync and async clients share: one reading of the broker's replies.

Both clients send the same bytes and accept or refuse exactly the same replies; only how
they wait differs.
"""

from __future__ import annotations

import fcntl
import os
import socket

from broker import fdpass
from broker.protocol import (
    SOCKET_ENV,
    BrokerUnreachable,
    LeaseInfo,
    ProtocolViolation,
    decode_reply,
)
from client.lease import Lease


def unreachable(socket_path: str, exc: OSError) -> BrokerUnreachable:
    """A failed connect, with what to check."""
    return BrokerUnreachable(
        f"cannot connect to the broker at {socket_path}: {exc.strerror}; is it running, and "
        f"may this user open the socket? (--socket or ${SOCKET_ENV} picks another)",
        errno=exc.errno,
        details={"path": socket_path},
    )


def decoded(datagram: fdpass.Datagram) -> tuple[dict, list[int]]:
    """The reply's payload and fds; the broker's error is raised and the fds closed."""
    try:
        return decode_reply(datagram.data), datagram.fds
    except BaseException:
        fdpass.close_all(datagram.fds)
        raise


def above_stdio(fds: list[int]) -> list[int]:
    """Move any fd that landed on 0-2 (a caller with closed stdio) above them.

    QEMU and libxdp treat fd 0 as "no fd given", and a child's stdio would clobber them.
    """
    moved = []
    for fd in fds:
        if fd <= 2:
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = new
        moved.append(fd)
    return moved


def lease_from_reply(payload: dict, fds: list[int], queues: int) -> Lease:
    """Check the reply carries exactly one fd per queue before trusting it."""
    try:
        info = LeaseInfo.from_wire(payload["lease"])
    except (KeyError, TypeError) as exc:
        fdpass.close_all(fds)
        raise ProtocolViolation(f"request reply has no valid lease: {exc}") from None
    if len(fds) != queues or len(info.queue_ids) != queues:
        fdpass.close_all(fds)
        raise ProtocolViolation(f"asked for {queues} queue(s), got {len(fds)} fd(s)")
    return Lease(info, above_stdio(fds))


def refusal_or_raise(sock: socket.socket, max_fds: int, exc: OSError) -> fdpass.Datagram:
    """The broker refuses some connections at accept (too many open) and closes them. Its
    reply is then queued although the send or the first read failed: the kernel reports
    ECONNRESET (our request went unread) before the datagrams still queued."""
    datagram = fdpass.pending(sock, max_fds)
    if datagram is None:
        raise ProtocolViolation(
            f"the broker closed the connection before the request was sent: {exc.strerror}",
            errno=exc.errno,
        ) from None
    return datagram
