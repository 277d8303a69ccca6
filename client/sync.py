"""The blocking client: one connection per exchange, typed replies and errors."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from broker import fdpass
from broker.errors import Timeout
from broker.protocol import (
    Detach,
    Detached,
    Granted,
    Ping,
    Pong,
    Release,
    Released,
    Request,
    Revoke,
    Revoked,
    Status,
    StatusQuery,
)
from client.exchange import (
    Exchange,
    R,
    broker_uid_from,
    check_broker,
    socket_path_from,
    unreachable,
)
from client.lease import Lease


class Client:
    """Talks to one broker socket; every method is one request and one reply, and raises
    the broker's error as its typed BrokerError subclass."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        *,
        broker_uid: int | None = None,
    ):
        """broker_uid: a uid besides root and this user that the broker may run as
        (default $XSK_BROKER_UID); any other listener is refused (UntrustedBroker)."""
        self.socket_path = socket_path_from(socket_path)
        self.timeout = timeout
        self.broker_uid = broker_uid_from(broker_uid)

    def exchange(self, exchange: Exchange[R]) -> tuple[R, list[int]]:
        """Drive one exchange over a fresh connection: BrokerUnreachable, Timeout, or the
        reply and its fds."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(self.timeout)
            self._connect(sock)
            try:
                fdpass.send(sock, exchange.datagram)
                datagram = fdpass.receive_reply(sock, exchange.max_fds)
            except TimeoutError:
                raise Timeout(f"no reply from the broker within {self.timeout} s") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                datagram = exchange.refusal(sock, exc)
        return exchange.finish(datagram)

    def _connect(self, sock: socket.socket) -> None:
        """Connect, waiting while the broker's backlog is full (EAGAIN from a unix socket's
        connect() means that, not "in progress"), as the asyncio client does; then check who
        answers (check_broker)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock.connect(self.socket_path)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Timeout(
                        f"the broker's backlog stayed full for {self.timeout} s"
                    ) from None
                time.sleep(0.005)
            except OSError as exc:
                raise unreachable(self.socket_path, exc) from None
        check_broker(sock, self.socket_path, self.broker_uid)

    def lease(self, request: Request) -> Lease:
        """Sockets for request, one fd per queue in queue order."""
        granted, fds = self.exchange(Exchange(request, Granted))
        return Lease(granted.lease, fds)

    def request(self, ifname: str, queues: int, *args: Any, **options: Any) -> Lease:
        """Sockets for queues start_queue.. of ifname; the rest as protocol.Request takes."""
        return self.lease(Request(ifname, queues, *args, **options))

    def status(
        self, *, ifname: str | None = None, lease_id: str | None = None, uid: int | None = None
    ) -> Status:
        """Attachments and the leases this caller may see (its own; an admin's, all) that
        match the filters given; .leases_filtered and .leases_trimmed count the rest."""
        return self.exchange(Exchange(StatusQuery(ifname, lease_id, uid), Status))[0]

    def ping(self) -> Pong:
        return self.exchange(Exchange(Ping(), Pong))[0]

    def release(self, lease_id: str) -> Released:
        return self.exchange(Exchange(Release(lease_id), Released))[0]

    def revoke(self, lease_id: str) -> Revoked:
        """Admin: end someone's lease and empty its slots (traffic back to the stack)."""
        return self.exchange(Exchange(Revoke(lease_id), Revoked))[0]

    def detach(self, ifname: str, force: bool = False) -> Detached:
        """Take the program off ifname (admin); live leases refuse it unless force."""
        return self.exchange(Exchange(Detach(ifname, force), Detached))[0]


def request(
    ifname: str, queues: int, *, socket_path: str | os.PathLike[str] | None = None, **options: Any
) -> Lease:
    """One-shot `Client(socket_path).request(ifname, queues, **options)`."""
    return Client(socket_path).request(ifname, queues, **options)
