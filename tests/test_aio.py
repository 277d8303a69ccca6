"""AsyncClient against a real broker (`xsk-broker serve`) on a veth in a private netns.

The `broker` fixture (conftest.py) is one 64-queue broker shared by the session.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

import pytest

from broker.errors import (
    BadQueues,
    BadRequest,
    BrokerError,
    BrokerUnreachable,
    ConsumerGone,
    NoSuchDevice,
    NoSuchLease,
    ProtocolViolation,
    QueueBusy,
    Timeout,
)
from broker.protocol import Released
from client.aio import AsyncClient
from client.lease import Lease
from lab.brokerproc import BrokerEnv

AF_XDP = 44
QUEUES = 64


@pytest.mark.kernel
def test_fifty_concurrent_requests_from_one_loop(broker: BrokerEnv) -> None:
    client = AsyncClient(broker.socket_path)

    async def scenario() -> tuple[list[Lease], list[str], list[str]]:
        leases = await asyncio.gather(
            *(client.request(broker.ifname, 1, q, tag=f"c{q}") for q in range(50))
        )
        live = [x.lease_id for x in (await client.status()).leases]
        await asyncio.gather(*(client.release(lease.lease_id) for lease in leases))
        after = [x.lease_id for x in (await client.status()).leases]
        return leases, live, after

    leases, live, after = asyncio.run(scenario())
    try:
        assert [lease.queue_ids for lease in leases] == [[q] for q in range(50)]
        for lease in leases:
            assert len(lease.fds) == 1 and lease.fds[0] > 2
            assert lease.mode in ("native", "skb")
            with socket.socket(AF_XDP, socket.SOCK_RAW, 0, os.dup(lease.fds[0])) as sock:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == AF_XDP
            assert f"start-queue={lease.start_queue}," in lease.netdev_arg()
        ids = {lease.lease_id for lease in leases}
        assert len(ids) == 50 and ids <= set(live)
        assert not ids & set(after)
    finally:
        for lease in leases:
            lease.close()


@pytest.mark.kernel
def test_broker_errors_arrive_as_their_types(broker: BrokerEnv) -> None:
    client = AsyncClient(broker.socket_path)
    gone = subprocess.Popen(["true"])
    gone.wait()

    async def outcome(call: Awaitable[Lease | Released]) -> BrokerError | None:
        try:
            answer = await call
        except BrokerError as error:
            return error
        if isinstance(answer, Lease):
            answer.close()
        return None

    async def scenario() -> Sequence[BrokerError | None]:
        held = await client.request(broker.ifname, 1, 60)
        try:
            return await asyncio.gather(
                outcome(client.request("nosuch0", 1)),
                outcome(client.request(broker.ifname, 1, QUEUES)),
                outcome(client.request(broker.ifname, 1, 60)),
                outcome(client.request("a/b", 1)),
                outcome(client.request(broker.ifname, 1, 61, consumer_pid=gone.pid)),
                outcome(client.release("0123456789ab")),
            )
        finally:
            held.close()
            await client.release(held.lease_id)

    got = asyncio.run(scenario())
    expected = [NoSuchDevice, BadQueues, QueueBusy, BadRequest, ConsumerGone, NoSuchLease]
    assert [type(error) for error in got] == expected
    for error, kind in zip(got, expected, strict=True):
        assert error is not None  # none is, by the assertion above
        assert error.code == kind.code and error.errno and error.message


@pytest.mark.kernel
def test_ping_reports_the_broker(broker: BrokerEnv) -> None:
    reply = asyncio.run(AsyncClient(broker.socket_path).ping())
    assert reply.broker and reply.pid > 0


def test_unreachable_names_path_and_errno(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.sock")
    with pytest.raises(BrokerUnreachable) as caught:
        asyncio.run(AsyncClient(path).ping())
    assert caught.value.errno == errno.ENOENT
    assert path in caught.value.message and caught.value.details["path"] == path
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as dead:
        dead.bind(str(stale))
    with pytest.raises(BrokerUnreachable) as caught:
        asyncio.run(AsyncClient(str(stale)).ping())
    assert caught.value.errno == errno.ECONNREFUSED


def test_socket_path_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "env.sock")
    monkeypatch.setenv("XSK_BROKER_SOCKET", path)
    assert AsyncClient().socket_path == path


def test_silent_peer_times_out(tmp_path: Path) -> None:
    """A broker that accepts (here: only the kernel's backlog) but never answers."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen()
        started = time.monotonic()
        with pytest.raises(Timeout):
            asyncio.run(AsyncClient(path, timeout=0.2).ping())
    assert time.monotonic() - started < 2


def test_peer_closing_without_reply_is_a_protocol_violation(tmp_path: Path) -> None:
    path = str(tmp_path / "closing.sock")

    async def scenario() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            listener.bind(path)
            listener.listen()
            listener.setblocking(False)
            loop = asyncio.get_running_loop()
            call = asyncio.create_task(AsyncClient(path).status())
            conn, _ = await loop.sock_accept(listener)
            conn.close()
            await call

    with pytest.raises(ProtocolViolation):
        asyncio.run(scenario())
