"""The blocking client: one connection per call, typed errors, fds never 0, 1 or 2."""

from __future__ import annotations

import os
import socket
from typing import Any

from broker import fdpass
from broker.protocol import (
    QEMU_UMEM_BYTES,
    Detach,
    Message,
    Ping,
    Release,
    Request,
    Revoke,
    StatusQuery,
    Timeout,
    encode_message,
    socket_path_from,
)
from client.lease import Lease
from client.transport import decoded, lease_from_reply, refusal_or_raise, unreachable


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
                raise unreachable(self.socket_path, exc) from None
            try:
                fdpass.send(sock, encode_message(message))
                datagram = fdpass.receive_reply(sock, max_fds)
            except TimeoutError:
                raise Timeout(f"no reply from the broker within {self.timeout} s") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                datagram = refusal_or_raise(sock, max_fds, exc)
        return decoded(datagram)

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
    ifname: str, queues: int, *, socket_path: str | os.PathLike | None = None, **options: Any
) -> Lease:
    """One-shot `Client(socket_path).request(ifname, queues, **options)`."""
    return Client(socket_path).request(ifname, queues, **options)
