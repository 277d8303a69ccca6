"""One exchange with the broker, without I/O: what to send, and what the reply means.

The sync and asyncio clients are drivers over this: they connect, send `datagram`, wait in
their own way and hand what arrived to `finish`. So both send the same bytes and accept or
refuse exactly the same replies.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from typing import Generic, TypeVar

from broker import fdpass
from broker.errors import BrokerUnreachable, ProtocolViolation, UntrustedBroker
from broker.protocol import (
    DEFAULT_SOCKET_PATH,
    SOCKET_ENV,
    Granted,
    Message,
    Reply,
    Request,
    decode_reply,
    encode_message,
)

R = TypeVar("R", bound=Reply)
BROKER_UID_ENV = "XSK_BROKER_UID"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path_from(path: str | os.PathLike[str] | None) -> str:
    """An explicit path, else $XSK_BROKER_SOCKET, else the system broker's path."""
    return os.fspath(path) if path else os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


@dataclass(frozen=True)
class Exchange(Generic[R]):
    """A message and the reply type it expects; max_fds is how many fds may come back."""

    message: Message
    reply: type[R]

    @property
    def datagram(self) -> bytes:
        return encode_message(self.message)

    @property
    def max_fds(self) -> int:
        message = self.message
        return message.queues if isinstance(message, Request) and not message.wants_map else 0

    def finish(self, datagram: fdpass.Datagram) -> tuple[R, list[int]]:
        """The typed reply and its fds; on any error the fds are closed and it is raised.

        A granted lease must carry exactly one fd per queue (none for a map lease); replies
        that carry no fds have any the broker sent anyway closed.
        """
        fds = datagram.fds
        try:
            reply = decode_reply(datagram.data, type(self.message))
            if not isinstance(reply, self.reply):
                raise ProtocolViolation(f"expected a {self.reply.op} reply, got {reply.op}")
            if isinstance(reply, Granted):
                _check_lease(reply, fds, self.max_fds)
        except BaseException:
            fdpass.close_all(fds)
            raise
        if isinstance(reply, Granted):
            return reply, above_stdio(fds)
        fdpass.close_all(fds)
        return reply, []

    def refusal(self, sock: socket.socket, exc: OSError) -> fdpass.Datagram:
        """The broker refuses some connections at accept (too many open) and closes them.
        Its reply is then queued although the send or the first read failed: the kernel
        reports ECONNRESET (our request went unread) before the datagrams still queued."""
        datagram = fdpass.pending(sock, self.max_fds)
        if datagram is None:
            raise ProtocolViolation(
                f"the broker closed the connection before the request was sent: {exc.strerror}",
                errno=exc.errno,
            ) from None
        return datagram


def broker_uid_from(uid: int | None) -> int | None:
    """An explicit broker uid, else $XSK_BROKER_UID, else None (root or this user only)."""
    env = os.environ.get(BROKER_UID_ENV, "")
    return uid if uid is not None else int(env) if env.isdigit() else None


def check_broker(sock: socket.socket, socket_path: str, broker_uid: int | None) -> None:
    """Refuse a listener that runs as another uid than root, this user or broker_uid,
    before a byte is sent: whoever could take the socket's path could otherwise answer,
    see the request and hand over fds of its own. SO_PEERCRED names whoever called
    listen(): systemd (uid 0) under socket activation, else the broker itself."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(creds)
    if uid in (0, os.geteuid(), broker_uid):
        return
    raise UntrustedBroker(
        f"the process listening on {socket_path} (pid {pid}) runs as uid {uid}, not as root "
        f"or this user: it is not the broker, or set ${BROKER_UID_ENV}={uid} if the broker "
        "really runs as that uid",
        details={"path": socket_path, "uid": uid},
    )


def _check_lease(reply: Granted, fds: list[int], expected: int) -> None:
    if len(fds) != expected or (expected and len(reply.lease.queue_ids) != expected):
        raise ProtocolViolation(f"expected {expected} fd(s) with the lease, got {len(fds)}")


def unreachable(socket_path: str, exc: OSError) -> BrokerUnreachable:
    """A failed connect, with what to check."""
    return BrokerUnreachable(
        f"cannot connect to the broker at {socket_path}: {exc.strerror}; is it running, and "
        f"may this user open the socket? (--socket or ${SOCKET_ENV} picks another)",
        errno=exc.errno,
        details={"path": socket_path},
    )


def above_stdio(fds: list[int]) -> list[int]:
    """Move any fd that landed on 0-2 (a caller with closed stdio) above them.

    QEMU and libxdp treat fd 0 as "no fd given", and a child's stdio would clobber them.
    """
    moved: list[int] = []
    try:
        for fd in fds:
            if fd <= 2:
                new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                os.close(fd)
                fd = new
            moved.append(fd)
    except OSError:  # EMFILE: close what was moved and what was not reached yet
        fdpass.close_all(moved + fds[len(moved) :])
        raise
    return moved
