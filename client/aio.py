"""The broker client for asyncio programs (VM managers), one connection per call.

asyncio has no recvmsg-with-fds helper, so the reply is read with broker.fdpass on a
non-blocking socket once the loop reports it readable. Parsing is shared with the sync
client (client/transport.py), so both accept and refuse exactly the same replies. Error
replies are raised as their typed BrokerError subclasses; a failed connect is
BrokerUnreachable (path and errno); no reply within the timeout is protocol.Timeout.
"""

from __future__ import annotations

import asyncio
import os
import socket

from broker import fdpass
from broker.protocol import (
    Message,
    Ping,
    Release,
    Request,
    StatusQuery,
    Timeout,
    encode_message,
    socket_path_from,
)
from client.lease import Lease
from client.transport import decoded, lease_from_reply, refusal_or_raise, unreachable


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class AsyncClient:
    """Talks to the broker at socket_path ($XSK_BROKER_SOCKET or the default when None)."""

    def __init__(
        self, socket_path: str | os.PathLike | None = None, timeout: float | None = 30.0
    ) -> None:
        self.socket_path = socket_path_from(socket_path)
        self.timeout = timeout

    async def call(self, message: Message, max_fds: int = 0) -> tuple[dict, list[int]]:
        """Send message, return the reply payload and any fds (raising the broker's error)."""
        loop = asyncio.get_running_loop()
        kind = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        with socket.socket(socket.AF_UNIX, kind) as sock:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._connect(sock)
                    await loop.sock_sendall(sock, encode_message(message))
                    datagram = await self._receive(sock, max_fds)
            except TimeoutError:
                raise Timeout(f"no reply from the broker within {self.timeout} s") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                datagram = refusal_or_raise(sock, max_fds, exc)
        return decoded(datagram)

    async def _connect(self, sock: socket.socket) -> None:
        """Connect, waiting while the broker's backlog is full.

        A unix socket's connect() is never "in progress": EAGAIN means a full backlog, so
        it is retried rather than handed to loop.sock_connect, which would wait for a
        writability that says nothing here.
        """
        while True:
            try:
                sock.connect(self.socket_path)
                return
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError as exc:
                raise unreachable(self.socket_path, exc) from None

    @staticmethod
    async def _receive(sock: socket.socket, max_fds: int) -> fdpass.Datagram:
        while True:
            try:
                return fdpass.receive_reply(sock, max_fds)
            except BlockingIOError:
                await _readable(sock)

    async def _call_no_fds(self, message: Message) -> dict:
        payload, fds = await self.call(message)
        fdpass.close_all(fds)
        return payload

    async def request(
        self,
        ifname: str,
        queues: int,
        start_queue: int = 0,
        mode: str = "auto",
        tag: str | None = None,
        consumer_pid: int | None = None,
        umem_bytes: int | None = None,
    ) -> Lease:
        """Sockets for queues [start_queue, start_queue + queues) of ifname, as a Lease.

        The fds arrive close-on-exec; Lease.make_inheritable() before handing them to a child.
        Raises the BrokerError subclass for the broker's error code.
        """
        extra = {} if umem_bytes is None else {"umem_bytes": umem_bytes}
        message = Request(ifname, queues, start_queue, mode, tag, consumer_pid, **extra)
        payload, fds = await self.call(message, max_fds=queues)
        return lease_from_reply(payload, fds, queues)

    async def status(self) -> dict:
        """The broker's view of attachments and leases (the reply payload)."""
        return await self._call_no_fds(StatusQuery())

    async def ping(self) -> dict:
        """A liveness check; the payload carries the broker's version."""
        return await self._call_no_fds(Ping())

    async def release(self, lease_id: str) -> None:
        """End one of the caller's leases now; raises NoSuchLease for an unknown id."""
        await self._call_no_fds(Release(lease_id))
