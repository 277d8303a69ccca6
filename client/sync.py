"""The blocking client: one connection per call, typed errors, fds never 0, 1 or 2."""

from __future__ import annotations

import fcntl
import os
import socket

from broker import fdpass
from broker.protocol import (
    QEMU_UMEM_BYTES,
    SOCKET_ENV,
    BrokerUnreachable,
    Detach,
    LeaseInfo,
    Message,
    Ping,
    ProtocolViolation,
    Release,
    Request,
    Revoke,
    StatusQuery,
    Timeout,
    decode_reply,
    encode_message,
    socket_path_from,
)
from client.lease import Lease


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


class Client:
    """Talks to one broker socket; every method is one request and one reply."""

    def __init__(self, socket_path: str | os.PathLike | None = None, timeout: float = 30.0):
        self.socket_path = socket_path_from(socket_path)
        self.timeout = timeout

    def call(self, message: Message, max_fds: int = 0) -> tuple[dict, list[int]]:
        """Send message, return the reply payload and any fds (raising the broker's error)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                raise BrokerUnreachable(
                    f"cannot connect to the broker at {self.socket_path}: {exc.strerror}; "
                    f"is it running, and may this user open the socket? (--socket or "
                    f"${SOCKET_ENV} picks another)",
                    errno=exc.errno,
                ) from None
            try:
                fdpass.send(sock, encode_message(message))
            except (BrokenPipeError, ConnectionResetError) as exc:
                datagram = refusal_or_raise(sock, max_fds, exc)
            else:
                try:
                    datagram = fdpass.receive_reply(sock, max_fds)
                except TimeoutError:
                    raise Timeout(f"no reply from the broker within {self.timeout} s") from None
                except (BrokenPipeError, ConnectionResetError) as exc:
                    datagram = refusal_or_raise(sock, max_fds, exc)
        try:
            return decode_reply(datagram.data), datagram.fds
        except BaseException:
            fdpass.close_all(datagram.fds)
            raise

    def request(
        self,
        ifname: str,
        queues: int,
        start_queue: int = 0,
        mode: str = "auto",
        tag: str | None = None,
        consumer_pid: int | None = None,
        umem_bytes: int | None = None,
    ) -> Lease:
        """Sockets for queues start_queue.. of ifname; raises the broker's typed error."""
        message = Request(
            ifname,
            queues,
            start_queue,
            mode,
            tag,
            consumer_pid,
            QEMU_UMEM_BYTES if umem_bytes is None else umem_bytes,
        )
        payload, fds = self.call(message, max_fds=queues)
        return lease_from_reply(payload, fds, queues)

    def call_no_fds(self, message: Message) -> dict:
        """call() for replies that carry no fds; any the broker sent anyway are closed."""
        payload, fds = self.call(message)
        fdpass.close_all(fds)
        return payload

    def status(self) -> dict:
        return self.call_no_fds(StatusQuery())

    def ping(self) -> dict:
        return self.call_no_fds(Ping())

    def release(self, lease_id: str) -> None:
        self.call_no_fds(Release(lease_id))

    def revoke(self, lease_id: str) -> dict:
        """Admin: end someone's lease and empty its slots (traffic back to the stack)."""
        return self.call_no_fds(Revoke(lease_id))

    def detach(self, ifname: str, force: bool = False) -> dict:
        """Take the program off ifname (admin); live leases refuse it unless force."""
        return self.call_no_fds(Detach(ifname, force))


def request(
    ifname: str,
    queues: int,
    start_queue: int = 0,
    mode: str = "auto",
    tag: str | None = None,
    consumer_pid: int | None = None,
    umem_bytes: int | None = None,
    socket_path: str | os.PathLike | None = None,
) -> Lease:
    """One-shot `Client(socket_path).request(...)`."""
    return Client(socket_path).request(
        ifname, queues, start_queue, mode, tag, consumer_pid, umem_bytes
    )
