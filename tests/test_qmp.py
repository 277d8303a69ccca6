"""QMP hot-plug against a real qemu-system-x86_64 (Debian's 7.2: QMP and getfd, no af-xdp).

So netdev_add always fails here; what is proven is everything around it: the fds really
reach QEMU under their names, the rollback closes every one of them, QEMU's text comes back
verbatim, and the arguments fit QEMU's af-xdp schema.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient
from support import settled_fd_count, socket_links, wait_until, xsk_cli

from broker.errors import BrokerError
from broker.protocol import LeaseInfo, Request
from client.aio import AsyncClient
from client.lease import Lease
from client.qmp import (
    QmpError,
    attach,
    detach,
    device_args,
    fd_names,
    hotplug,
    session,
    unplug,
)
from lab.brokerproc import BrokerEnv, still_fd_count, unix_connections

pytestmark = pytest.mark.kernel  # real AF_XDP sockets (CAP_NET_RAW), the session's broker
AF_XDP = 44
# QEMU's own text, then which QEMU it was (client.qmp adds that).
NO_AFXDP = re.compile(
    r"Parameter 'type' does not accept value 'af-xdp' "
    r"\(QEMU 7\.2\.\d+ has no af-xdp netdev backend: it needs QEMU >= 8\.2 built with libxdp\)"
)


@dataclass
class Qemu:
    """A paused QEMU with a QMP socket; killed when the module is done."""

    proc: subprocess.Popen[bytes]
    qmp_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def quiet_fd_count(self) -> int:
        """A baseline: the fd count once no QMP connection is open or waiting (QEMU's main
        loop reaps one just closed when it gets to it) and it has held still for 100 ms."""
        wait_until(lambda: unix_connections(self.qmp_path) == (0, 0))
        return still_fd_count(self.pid)

    def settled_fd_count(self, expected: int) -> int:
        """The fd count once QEMU's main loop has closed a just-ended QMP connection."""
        return settled_fd_count(self.pid, expected)

    def socket_inodes(self) -> set[str]:
        return set(socket_links(Path(f"/proc/{self.pid}/fd")))


def start_qemu(directory: Path, *extra: str) -> Qemu:
    path = str(directory / "qmp.sock")
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-machine",
            "pc",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{path},server=on,wait=off",
            *extra,
        ],
        stdin=subprocess.DEVNULL,
    )
    wait_until(lambda: os.path.exists(path) or proc.poll() is not None)
    assert proc.poll() is None, "qemu-system-x86_64 exited during start-up"
    return Qemu(proc, path)


@pytest.fixture(scope="module")
def qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qemu]:
    vm = start_qemu(tmp_path_factory.mktemp("qemu"))
    try:
        # One QMP round trip first: QEMU opens more fds until its main loop serves QMP,
        # and each test compares against a baseline taken after that.
        asyncio.run(qmp_run(vm.qmp_path, "query-status"))
        yield vm
    finally:
        vm.proc.kill()
        vm.proc.wait()


def xsk_lease(queue_ids: list[int], ifname: str = "lo") -> Lease:
    """A broker-less Lease holding real, unbound AF_XDP sockets (root may make them)."""
    fds = [socket.socket(AF_XDP, socket.SOCK_RAW, 0).detach() for _ in queue_ids]
    return Lease(LeaseInfo("test-lease", ifname, 1, queue_ids, "skb"), fds)


async def qmp_run(qmp_path: str, command: str, args: Mapping[str, object] | None = None) -> object:
    async with session(qmp_path) as (client, _pid):
        return await client.execute(command, args)


def assert_nothing_registered(qemu: Qemu, names: list[str]) -> None:
    """closefd of each name fails: QEMU holds none of them any more."""
    for name in names:
        with pytest.raises(ExecuteError, match=f"File descriptor named '{name}' not found"):
            asyncio.run(qmp_run(qemu.qmp_path, "closefd", {"fdname": name}))


def test_fd_names_never_start_with_a_digit_or_hold_a_colon() -> None:
    assert fd_names("net1", [2, 3]) == ["xsk-net1-q2", "xsk-net1-q3"]
    for bad in ("1net", "a:b", "", "net 1"):
        with pytest.raises(QmpError) as caught:
            fd_names(bad, [0])
        assert caught.value.errno == errno.EINVAL


def test_device_spec_becomes_device_add_arguments() -> None:
    assert device_args("virtio-net-pci,mac=52:54:00:12:34:56,mq,romfile=a,,b", "n1") == {
        "driver": "virtio-net-pci",
        "mac": "52:54:00:12:34:56",
        "mq": "on",
        "romfile": "a,b",
        "netdev": "n1",
        "id": "n1-dev",
    }
    for bad in ("virtio-net-pci,id=x", "virtio-net-pci,netdev=y", ",mac=1", "mac=1"):
        with pytest.raises(QmpError):
            device_args(bad, "n1")


def test_hotplug_sends_each_fd_and_rolls_back_when_netdev_add_fails(qemu: Qemu) -> None:
    baseline = qemu.quiet_fd_count()
    lease = xsk_lease([2, 3, 4])
    names = fd_names("hp1", lease.queue_ids)
    with lease, pytest.raises(QmpError) as caught:
        asyncio.run(hotplug(qemu.qmp_path, lease, "hp1"))
    error = caught.value
    assert error.code == "QMP_ERROR"
    assert NO_AFXDP.fullmatch(error.message)
    assert error.details["command"] == "netdev_add"
    # Each closefd of the rollback succeeded, so each getfd had registered its name.
    assert error.details["rolled_back"] == [
        {"command": "closefd", "args": {"fdname": name}, "ok": True} for name in reversed(names)
    ]
    assert_nothing_registered(qemu, names)
    assert qemu.settled_fd_count(baseline) == baseline


def test_hotplug_leaves_the_lease_fds_to_the_caller(qemu: Qemu) -> None:
    lease = xsk_lease([0])
    with lease:
        with pytest.raises(QmpError):
            asyncio.run(hotplug(qemu.qmp_path, lease, "hp2", device=None))
        with socket.socket(AF_XDP, socket.SOCK_RAW, 0, os.dup(lease.fds[0])) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == AF_XDP


def test_getfd_hands_qemu_the_very_socket(qemu: Qemu) -> None:
    """The primitive hotplug() relies on: send_fd_scm + getfd gives QEMU our socket."""
    sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
    inode = f"socket:[{os.fstat(sock.fileno()).st_ino}]"

    async def register() -> None:
        async with session(qemu.qmp_path) as (client, pid):
            assert pid == qemu.pid
            client.send_fd_scm(sock.fileno())
            await client.execute("getfd", {"fdname": "xsk-probe-q0"})

    with sock:
        asyncio.run(register())
        assert inode in qemu.socket_inodes()
    asyncio.run(qmp_run(qemu.qmp_path, "closefd", {"fdname": "xsk-probe-q0"}))
    assert inode not in qemu.socket_inodes()


def test_unplug_removes_device_and_netdev(qemu: Qemu) -> None:
    """A user netdev stands in for af-xdp, which this QEMU cannot create."""
    asyncio.run(qmp_run(qemu.qmp_path, "netdev_add", {"type": "user", "id": "up1"}))
    spec = "virtio-net-pci,mac=52:54:00:12:34:56,mq=on,vectors=4"
    asyncio.run(qmp_run(qemu.qmp_path, "device_add", device_args(spec, "up1")))
    result = asyncio.run(unplug(qemu.qmp_path, "up1", device_timeout=0.2))
    # A paused guest never acknowledges device_del; the netdev goes anyway.
    assert (result.device_found, result.device_released, result.netdev_removed) == (
        True,
        False,
        True,
    )
    with pytest.raises(QmpError) as caught:
        asyncio.run(unplug(qemu.qmp_path, "never-plugged", device_timeout=0.2))
    assert caught.value.errno == errno.ENOENT


def test_detach_says_when_the_nic_went_but_the_lease_could_not_end(
    qemu: Qemu, broker: BrokerEnv, tmp_path: Path
) -> None:
    asyncio.run(qmp_run(qemu.qmp_path, "netdev_add", {"type": "user", "id": "up2"}))
    with pytest.raises(BrokerError) as caught:
        asyncio.run(detach(qemu.qmp_path, "up2", socket_path=str(tmp_path / "absent.sock")))
    assert caught.value.message.startswith("up2 was removed from QEMU, but its lease was not")
    # with the broker reachable: nothing of this caller's is tagged up3, so nothing ends
    asyncio.run(qmp_run(qemu.qmp_path, "netdev_add", {"type": "user", "id": "up3"}))
    result = asyncio.run(detach(qemu.qmp_path, "up3", socket_path=broker.socket_path))
    assert (result.netdev_removed, result.leases_released) == (True, [])


def test_unreachable_qmp_socket_is_a_typed_error(tmp_path: Path) -> None:
    lease = xsk_lease([0])
    with lease, pytest.raises(QmpError) as caught:
        asyncio.run(hotplug(str(tmp_path / "absent.sock"), lease, "x1"))
    assert caught.value.errno == errno.ENOENT


def test_netdev_args_are_exactly_af_xdps_members() -> None:
    """The netdev_add arguments; the af-xdp QEMU accepts them in test_qemu_afxdp's hot-plug."""
    lease = xsk_lease([1, 2], ifname="eth7")
    with lease:
        args = lease.netdev_qmp("s1", fd_names("s1", lease.queue_ids))
    assert args == {
        "type": "af-xdp",
        "id": "s1",
        "ifname": "eth7",
        "mode": lease.mode,
        "queues": 2,
        "start-queue": 1,
        "inhibit": True,
        "sock-fds": "xsk-s1-q1:xsk-s1-q2",
    }


def test_attach_with_a_real_lease_rolls_back_and_ends_it(broker: BrokerEnv, qemu: Qemu) -> None:
    """Broker lease for QEMU (pid from SO_PEERCRED), getfd, netdev_add fails, all undone."""
    baseline = qemu.quiet_fd_count()

    async def scenario() -> tuple[QmpError, list[LeaseInfo]]:
        with pytest.raises(QmpError) as caught:
            await attach(
                qemu.qmp_path, Request(broker.ifname, 2, 5), "att1", socket_path=broker.socket_path
            )
        return caught.value, (await AsyncClient(broker.socket_path).status()).leases

    error, leases = asyncio.run(scenario())
    assert NO_AFXDP.fullmatch(error.message)
    assert error.details["lease_released"] is True
    assert [step["ok"] for step in error.details["rolled_back"]] == [True, True]
    assert not [lease for lease in leases if lease.tag == "att1"]
    assert_nothing_registered(qemu, fd_names("att1", [5, 6]))
    assert qemu.settled_fd_count(baseline) == baseline


def test_attach_makes_qemu_the_consumer(broker: BrokerEnv, qemu: Qemu) -> None:
    """While the hot-plug runs the lease names QEMU's pid, not ours."""

    async def scenario() -> LeaseInfo:
        async with session(qemu.qmp_path) as (_client, pid):
            lease = await AsyncClient(broker.socket_path).request(
                broker.ifname, 1, 9, tag="att2", consumer_pid=pid
            )
            with lease:
                status = await AsyncClient(broker.socket_path).status()
                await AsyncClient(broker.socket_path).release(lease.lease_id)
        return next(x for x in status.leases if x.lease_id == lease.lease_id)

    assert asyncio.run(scenario()).consumer_pid == qemu.pid


def test_qmp_client_may_be_shared_with_a_vm_manager(qemu: Qemu) -> None:
    """A VM manager that holds the monitor passes its QMPClient instead of a path."""

    async def scenario() -> str:
        client = QMPClient("vm-manager")
        await client.connect(qemu.qmp_path)
        try:
            with xsk_lease([0]) as lease, pytest.raises(QmpError) as caught:
                await hotplug(client, lease, "shared1")
            assert client.runstate.name == "RUNNING"
            return caught.value.message
        finally:
            await client.disconnect()

    assert NO_AFXDP.fullmatch(asyncio.run(scenario()))


def test_cli_attach_reports_qemus_error_verbatim_and_ends_the_lease(
    broker: BrokerEnv, qemu: Qemu
) -> None:
    argv = ["attach-nic", "--qmp", qemu.qmp_path,
            "--socket", broker.socket_path, "--ifname", broker.ifname, "--queues", "2",
            "--start-queue", "20", "--id", "cli1", "--tag", "cli-attach"]  # fmt: skip
    result = xsk_cli(*argv, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("QMP_ERROR: Parameter 'type' does not accept value 'af-xdp'")
    assert result.stderr.count("\n") == 1
    leases = asyncio.run(AsyncClient(broker.socket_path).status()).leases
    assert not [lease for lease in leases if lease.tag == "cli-attach"]
    gone = xsk_cli("detach-nic", "--qmp", qemu.qmp_path, "--id", "cli1", "--json", timeout=60)
    assert gone.returncode == 1
    assert gone.stderr == "QMP_ERROR: QEMU has neither a netdev 'cli1' nor a device 'cli1-dev'\n"
