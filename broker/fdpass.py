"""SCM_RIGHTS over SOCK_SEQPACKET: one datagram, its fds, and nothing smuggled beside it."""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import FdsRefused, MessageTooLarge, ProtocolViolation
from broker.protocol import MAX_MESSAGE_BYTES

_INT_SIZE = array.array("i").itemsize
SCM_MAX_FD = 253  # the most fds one message can carry (include/net/scm.h)


@dataclass
class Datagram:
    """One received message; fds are owned by the receiver and must be closed by it."""

    data: bytes
    fds: list[int]
    truncated: bool


def _collect_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def receive(sock: socket.socket, max_fds: int, max_bytes: int = MAX_MESSAGE_BYTES) -> Datagram:
    """Read one datagram with room for max_fds descriptors, marking any truncation.

    Every received fd is made close-on-exec (MSG_CMSG_CLOEXEC) so that none leaks into a
    child by accident; callers that hand fds to a child clear the flag on purpose.
    """
    ancsize = socket.CMSG_SPACE(max_fds * _INT_SIZE) if max_fds else socket.CMSG_SPACE(_INT_SIZE)
    data, ancdata, flags, _ = sock.recvmsg(max_bytes + 1, ancsize, socket.MSG_CMSG_CLOEXEC)
    fds = _collect_fds(ancdata)
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > max_bytes
    return Datagram(data, fds, truncated)


def receive_request(sock: socket.socket, dispose: Callable[[list[int]], None] = close_all) -> bytes:
    """Read a client's datagram, refusing fds and anything cut short.

    There is room for every fd a message can carry, so the kernel drops none in this thread
    (dropping one runs its last close here); each goes to dispose, which the loop points at
    a thread of its own (fdguard.Closer).
    """
    datagram = receive(sock, max_fds=SCM_MAX_FD)
    dispose(datagram.fds)
    if datagram.fds:
        raise FdsRefused(f"clients may not send file descriptors; {len(datagram.fds)} closed")
    if datagram.truncated:
        raise MessageTooLarge(
            f"message or its control data was truncated; the limit is {MAX_MESSAGE_BYTES} bytes"
        )
    return datagram.data


def receive_reply(sock: socket.socket, max_fds: int) -> Datagram:
    """Read the broker's reply; a truncated one is closed and raised, never half-used."""
    datagram = receive(sock, max_fds)
    if datagram.truncated:
        close_all(datagram.fds)
        raise ProtocolViolation("the broker's reply was truncated; fds or bytes were lost")
    if not datagram.data:
        close_all(datagram.fds)
        raise ProtocolViolation("the broker closed the connection without replying")
    return datagram


def pending(sock: socket.socket, max_fds: int) -> Datagram | None:
    """A reply already queued, without waiting: after a failed send, the broker may have
    refused the connection (and closed it) with a reply the client has not read yet."""
    ancsize = socket.CMSG_SPACE(max(max_fds, 1) * _INT_SIZE)
    try:
        data, ancdata, flags, _ = sock.recvmsg(
            MAX_MESSAGE_BYTES + 1, ancsize, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
        )
    except OSError:
        return None
    datagram = Datagram(
        data, _collect_fds(ancdata), bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    )
    if not data or datagram.truncated:
        close_all(datagram.fds)
        return None
    return datagram


def send(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one datagram with fds attached (the caller still owns and closes its fds)."""
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendmsg([data])
