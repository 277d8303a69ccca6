"""The broker client for asyncio programs (VM managers), one connection per exchange.

asyncio has no recvmsg-with-fds helper, so the reply is read with broker.fdpass on a
non-blocking socket once the loop reports it readable. What is sent and how replies are
read is client/exchange.py, shared with the sync client. Error replies are raised as their
typed BrokerError subclasses; a failed connect is BrokerUnreachable (path and errno); no
reply within the timeout is Timeout.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from broker import fdpass
from broker.errors import Timeout
from broker.protocol import Granted, Ping, Pong, Release, Released, Request, Status, StatusQuery
from client.exchange import (
    Exchange,
    R,
    broker_uid_from,
    check_broker,
    socket_path_from,
    unreachable,
)
from client.lease import Lease


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class AsyncClient:
    """Talks to the broker at socket_path ($XSK_BROKER_SOCKET or the default when None)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        *,
        broker_uid: int | None = None,
    ) -> None:
        """broker_uid: as Client's."""
        self.socket_path = socket_path_from(socket_path)
        self.timeout = timeout
        self.broker_uid = broker_uid_from(broker_uid)

    async def exchange(self, exchange: Exchange[R]) -> tuple[R, list[int]]:
        """Drive one exchange over a fresh non-blocking connection."""
        loop = asyncio.get_running_loop()
        kind = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        with socket.socket(socket.AF_UNIX, kind) as sock:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._connect(sock)
                    await loop.sock_sendall(sock, exchange.datagram)
                    datagram = await self._receive(sock, exchange.max_fds)
            except TimeoutError:
                raise Timeout(f"no reply from the broker within {self.timeout} s") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                datagram = exchange.refusal(sock, exc)
        return exchange.finish(datagram)

    async def _connect(self, sock: socket.socket) -> None:
        """Connect, waiting while the broker's backlog is full.

        A unix socket's connect() is never "in progress": EAGAIN means a full backlog, so
        it is retried rather than handed to loop.sock_connect, which would wait for a
        writability that says nothing here.
        """
        while True:
            try:
                sock.connect(self.socket_path)
                break
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError as exc:
                raise unreachable(self.socket_path, exc) from None
        check_broker(sock, self.socket_path, self.broker_uid)

    @staticmethod
    async def _receive(sock: socket.socket, max_fds: int) -> fdpass.Datagram:
        while True:
            try:
                return fdpass.receive_reply(sock, max_fds)
            except BlockingIOError:
                await _readable(sock)

    async def lease(self, request: Request) -> Lease:
        """Sockets for request as a Lease; the fds arrive close-on-exec
        (Lease.make_inheritable() before handing them to a child)."""
        granted, fds = await self.exchange(Exchange(request, Granted))
        return Lease(granted.lease, fds)

    async def request(self, ifname: str, queues: int, *args: Any, **options: Any) -> Lease:
        """Sockets for queues [start_queue, start_queue + queues) of ifname, as a Lease."""
        return await self.lease(Request(ifname, queues, *args, **options))

    async def status(
        self, *, ifname: str | None = None, lease_id: str | None = None, uid: int | None = None
    ) -> Status:
        """Attachments and the leases this caller may see (its own; an admin's, all) that
        match the filters given; .leases_filtered and .leases_trimmed count the rest."""
        query = StatusQuery(ifname, lease_id, uid)
        return (await self.exchange(Exchange(query, Status)))[0]

    async def ping(self) -> Pong:
        """A liveness check; the reply carries the broker's version."""
        return (await self.exchange(Exchange(Ping(), Pong)))[0]

    async def release(self, lease_id: str) -> Released:
        """End one of the caller's leases now; raises NoSuchLease for an unknown id."""
        return (await self.exchange(Exchange(Release(lease_id), Released)))[0]
