"""Hot-plug broker sockets into a running QEMU over QMP, and take them out again.

The flow (getfd per socket, netdev_add af-xdp with `sock-fds` naming them, device_add, and
the reverse) runs over a Monitor, which carries QMP commands and fds to QEMU. QmpMonitor is
QEMU's own monitor socket through the `qemu.qmp` library (`send_fd_scm()` then `getfd`);
client.libvirt.LibvirtMonitor is libvirt's qemuMonitorCommandWithFiles. Every step that
succeeded is undone in reverse when a later one fails, and the QMP error text is raised
verbatim as QmpError.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno as errno_mod
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import NotRequired, Protocol, TypedDict

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.events import EventListener

from broker.errors import BrokerError, LocalError, NoSuchLease
from broker.protocol import LeaseInfo, Request
from client.aio import AsyncClient
from client.lease import Lease, NetdevQmpArgs

DEFAULT_DEVICE = "virtio-net-pci"
# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class QmpError(LocalError):
    """QEMU refused a command; message is QEMU's text verbatim, details name the command."""

    code = "QMP_ERROR"
    default_errno = errno_mod.EIO


@dataclass(frozen=True)
class HotplugResult:
    """What hotplug() left in QEMU: the netdev, its device (None if not asked) and the lease."""

    netdev_id: str
    device_id: str | None
    fd_names: list[str]
    netdev_args: NetdevQmpArgs
    lease: LeaseInfo


@dataclass(frozen=True)
class UnplugResult:
    """device_released is False when the guest has not acknowledged device_del in time;
    leases_released names the leases detach() ended (unplug() alone ends none)."""

    netdev_id: str
    device_found: bool
    device_released: bool
    netdev_removed: bool
    leases_released: list[str] = field(default_factory=list)


class UndoStep(TypedDict):
    """One entry of a QmpError's details["rolled_back"]: an undo command and how it went."""

    command: str
    args: dict[str, str]
    ok: bool
    error: NotRequired[str]


class Monitor(Protocol):
    """A QEMU monitor the hot-plug flow runs over; pid is QEMU's when the transport knows it."""

    @property
    def pid(self) -> int | None: ...

    async def execute(self, command: str, args: Mapping[str, object] | None = None) -> object:
        """The command's return value; QmpError (details["class"] is QEMU's error class
        when QEMU refused it)."""
        ...

    async def getfd(self, name: str, fd: int) -> None:
        """QEMU gets its own copy of fd, registered as name."""
        ...

    def deletion(self, dev_id: str) -> AbstractAsyncContextManager[Callable[[], Awaitable[None]]]:
        """Entered before device_del: yields a wait that returns once the guest released
        dev_id (the caller bounds it with a timeout)."""
        ...


@dataclass(frozen=True)
class QmpMonitor:
    """QEMU's own QMP socket, through a connected QMPClient."""

    client: QMPClient
    pid: int | None = None

    async def execute(self, command: str, args: Mapping[str, object] | None = None) -> object:
        try:
            return await self.client.execute(command, args)
        except (QMPError, OSError) as exc:
            raise _qmp_error(command, exc) from exc

    async def getfd(self, name: str, fd: int) -> None:
        try:
            self.client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise _qmp_error("getfd", exc) from exc
        await self.execute("getfd", {"fdname": name})

    @contextlib.asynccontextmanager
    async def deletion(self, dev_id: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        with self.client.listener("DEVICE_DELETED") as events:
            yield lambda: _released(events, dev_id)


@dataclass
class _Undo:
    """Commands that reverse what a hot-plug did so far, run last-first."""

    steps: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def run(self, monitor: Monitor) -> list[UndoStep]:
        """Run every step even if some fail; a name QEMU already consumed is not an error."""
        report: list[UndoStep] = []
        for command, args in reversed(self.steps):
            try:
                await monitor.execute(command, args)
                report.append({"command": command, "args": args, "ok": True})
            except QmpError as exc:
                report.append({"command": command, "args": args, "ok": False, "error": str(exc)})
        return report


def check_id(netdev_id: str) -> str:
    """QEMU accepts only well-formed ids; checked here so fd names are valid too."""
    if not _QEMU_ID.match(netdev_id):
        raise QmpError(
            f"id {netdev_id!r} is not a QEMU id: start with a letter, then use letters, "
            "digits, '-', '.' or '_'",
            errno=errno_mod.EINVAL,
        )
    return netdev_id


def fd_names(netdev_id: str, queue_ids: list[int]) -> list[str]:
    """getfd names: never a leading digit or ':', which sock-fds would misread."""
    return [f"xsk-{check_id(netdev_id)}-q{q}" for q in queue_ids]


def device_id(netdev_id: str) -> str:
    """The device id derived from the netdev id, so unplug can find it from the id alone."""
    return f"{check_id(netdev_id)}-dev"


def _split_opts(spec: str) -> list[str]:
    """Split QEMU option syntax on ',' where ',,' stands for a literal comma."""
    return [part.replace("\0", ",") for part in spec.replace(",,", "\0").split(",")]


def device_args(spec: str, netdev_id: str) -> dict[str, str]:
    """device_add arguments from a `-device`-style spec such as "virtio-net-pci,mac=...".

    Values stay strings, as QEMU's device_add takes them like the command line does; `id`
    and `netdev` are derived from netdev_id and may not be given.
    """
    driver, *opts = _split_opts(spec)
    if not driver or "=" in driver:
        raise QmpError(
            f"device spec {spec!r} must start with a driver name", errno=errno_mod.EINVAL
        )
    args = {"driver": driver}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key in ("id", "netdev", "driver") or not key:
            raise QmpError(f"device option {opt!r} is not allowed here", errno=errno_mod.EINVAL)
        args[key] = value if sep else "on"
    args.update(netdev=netdev_id, id=device_id(netdev_id))
    return args


def _qmp_error(command: str, exc: Exception) -> QmpError:
    if isinstance(exc, ExecuteError):
        return QmpError(str(exc), details={"command": command, "class": exc.error_class})
    return QmpError(f"{command}: lost the QMP connection: {exc}", errno=errno_mod.EPIPE)


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


@contextlib.asynccontextmanager
async def session(qmp: str | QMPClient) -> AsyncIterator[tuple[QMPClient, int | None]]:
    """A connected QMPClient and QEMU's pid (from SO_PEERCRED; None for a given client).

    A path is connected here and disconnected afterwards; a QMPClient is used as it is,
    since QEMU's monitor serves one client at a time and a VM manager may hold it.
    """
    if isinstance(qmp, QMPClient):
        yield qmp, None
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    client = QMPClient(f"xsk-broker:{qmp}")
    try:
        await asyncio.get_running_loop().sock_connect(sock, qmp)
        pid = _peer_pid(sock)
        await client.connect(sock)
    except (OSError, ConnectError) as exc:
        sock.close()
        cause = exc.exc if isinstance(exc, ConnectError) else exc
        code = getattr(cause, "errno", None) or errno_mod.ECONNREFUSED
        raise QmpError(
            f"cannot connect to QEMU's QMP socket at {qmp}: {cause}",
            errno=code,
            details={"path": qmp},
        ) from exc
    try:
        yield client, pid
    finally:
        await client.disconnect()


MonitorLike = str | QMPClient | Monitor


@contextlib.asynccontextmanager
async def monitor_of(qmp: MonitorLike) -> AsyncIterator[Monitor]:
    """A Monitor for a QMP socket path (connected for the duration), a QMPClient, or a
    Monitor of any other transport (used as it is)."""
    if isinstance(qmp, str | QMPClient):
        async with session(qmp) as (client, pid):
            yield QmpMonitor(client, pid)
    else:
        yield qmp


async def _no_afxdp(monitor: Monitor, exc: QmpError) -> QmpError:
    """exc, told which QEMU lacks the backend when netdev_add was refused for the type."""
    if "does not accept value 'af-xdp'" not in exc.message:
        return exc
    try:
        version = await monitor.execute("query-version")
        qemu = version["qemu"] if isinstance(version, dict) else {}
        name = f"QEMU {qemu['major']}.{qemu['minor']}.{qemu['micro']}"
    except (QmpError, KeyError, TypeError):
        name = "this QEMU"
    exc.message += f" ({name} has no af-xdp netdev backend: it needs QEMU >= 8.2 built with libxdp)"
    return exc


async def hotplug(
    qmp: MonitorLike, lease: Lease, netdev_id: str, device: str | None = DEFAULT_DEVICE
) -> HotplugResult:
    """Give QEMU the lease's sockets as af-xdp netdev netdev_id, plus a NIC if device is set.

    getfd per fd, netdev_add, device_add; on any failure what was done is undone (netdev_del,
    closefd per name) and QmpError carries QEMU's text with details["rolled_back"]. The
    caller still owns the lease's fds: QEMU holds its own copies, so close the lease after.
    """
    names = fd_names(netdev_id, lease.queue_ids)
    netdev_args = lease.netdev_qmp(netdev_id, names)
    dev_args = device_args(device, netdev_id) if device else None
    undo = _Undo()
    async with monitor_of(qmp) as monitor:
        try:
            for fd, name in zip(lease.fds, names, strict=True):
                await monitor.getfd(name, fd)
                undo.steps.append(("closefd", {"fdname": name}))
            try:
                await monitor.execute("netdev_add", netdev_args)
            except QmpError as exc:
                raise await _no_afxdp(monitor, exc) from None
            undo.steps.append(("netdev_del", {"id": netdev_id}))
            if dev_args:
                await monitor.execute("device_add", dev_args)
        except BaseException as exc:
            report = await undo.run(monitor)
            if isinstance(exc, QmpError):
                exc.details["rolled_back"] = report
            raise
    return HotplugResult(
        netdev_id, dev_args["id"] if dev_args else None, names, netdev_args, lease.info
    )


async def _released(events: EventListener, dev_id: str) -> None:
    while True:
        data = (await events.get()).get("data", {})
        if not isinstance(data, Mapping):
            raise TypeError(f"DEVICE_DELETED data is not an object: {data!r}")
        if data.get("device") == dev_id:
            return


async def unplug(qmp: MonitorLike, netdev_id: str, *, device_timeout: float = 10.0) -> UnplugResult:
    """Remove the NIC hotplug() made: device_del, wait for the guest, then netdev_del.

    The netdev goes even if the guest has not released the device within device_timeout
    (device_released is then False), so the sockets are freed either way.
    """
    dev_id = device_id(netdev_id)
    async with monitor_of(qmp) as monitor:
        async with monitor.deletion(dev_id) as released_wait:
            device_found = await _delete(monitor, "device_del", dev_id)
            released = False
            if device_found:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(device_timeout):
                        await released_wait()
                        released = True
        netdev_removed = await _delete(monitor, "netdev_del", netdev_id)
    if not (device_found or netdev_removed):
        raise QmpError(
            f"QEMU has neither a netdev {netdev_id!r} nor a device {dev_id!r}",
            errno=errno_mod.ENOENT,
        )
    return UnplugResult(netdev_id, device_found, released, netdev_removed)


async def _delete(monitor: Monitor, command: str, object_id: str) -> bool:
    """Run a *_del command; False when QEMU says there is no such object."""
    try:
        await monitor.execute(command, {"id": object_id})
    except QmpError as exc:
        if exc.details.get("class") == "DeviceNotFound":
            return False
        raise
    return True


async def attach(
    qmp: MonitorLike,
    request: Request,
    netdev_id: str,
    *,
    device: str | None = DEFAULT_DEVICE,
    socket_path: str | None = None,
) -> HotplugResult:
    """Request sockets from the broker for QEMU and hot-plug them as netdev_id.

    The lease's consumer is QEMU (its pid is the Monitor's, from SO_PEERCRED for a QMP
    socket, unless request names consumer_pid, as it must with a QMPClient) and its tag
    defaults to netdev_id, so the lease lives as long as QEMU and detach() finds it. On
    failure the lease is released again. Our copies of the fds are always closed.
    """
    check_id(netdev_id)
    async with monitor_of(qmp) as monitor:
        broker = AsyncClient(socket_path)
        request = dataclasses.replace(
            request, tag=request.tag or netdev_id, consumer_pid=request.consumer_pid or monitor.pid
        )
        with await broker.lease(request) as lease:
            try:
                return await hotplug(monitor, lease, netdev_id, device)
            except BaseException as exc:
                try:
                    await broker.release(lease.lease_id)
                    released: bool | str = True
                except BrokerError as release_error:
                    released = str(release_error)
                if isinstance(exc, QmpError):
                    exc.details["lease_released"] = released
                raise


def attach_nic(
    qmp_path: str,
    request: Request,
    netdev_id: str,
    *,
    device: str | None = DEFAULT_DEVICE,
    socket_path: str | None = None,
) -> HotplugResult:
    """attach() for synchronous callers such as `xsk-broker attach-nic`."""
    return asyncio.run(attach(qmp_path, request, netdev_id, device=device, socket_path=socket_path))


async def detach(
    qmp: MonitorLike,
    netdev_id: str,
    *,
    tag: str | None = None,
    consumer_pid: int | None = None,
    device_timeout: float = 10.0,
    socket_path: str | None = None,
) -> UnplugResult:
    """unplug(), then end the lease attach() made for netdev_id, so its queues are free at
    once rather than when QEMU exits. That lease is the caller's lease whose consumer is
    this QEMU (SO_PEERCRED of the QMP socket, or consumer_pid) and whose tag is tag, which
    defaults to netdev_id as in attach()."""
    async with monitor_of(qmp) as monitor:
        result = await unplug(monitor, netdev_id, device_timeout=device_timeout)
    qemu_pid = consumer_pid or monitor.pid
    if qemu_pid is None:
        raise QmpError("give consumer_pid with a QMPClient: the lease is found by QEMU's pid")
    broker = AsyncClient(socket_path)
    try:
        ended = [
            lease.lease_id
            for lease in (await broker.status()).leases
            if lease.tag == (tag or netdev_id)
            and lease.consumer_pid == qemu_pid
            and lease.uid == os.geteuid()
        ]
        for lease_id in ended:
            with contextlib.suppress(NoSuchLease):  # it ended meanwhile (QEMU exited)
                await broker.release(lease_id)
    except BrokerError as exc:
        exc.message = (
            f"{netdev_id} was removed from QEMU, but its lease was not ended: {exc.message}"
        )
        raise
    return dataclasses.replace(result, leases_released=ended)


def detach_nic(
    qmp_path: str,
    netdev_id: str,
    *,
    tag: str | None = None,
    device_timeout: float = 10.0,
    socket_path: str | None = None,
) -> UnplugResult:
    """detach() for synchronous callers such as `xsk-broker detach-nic`."""
    return asyncio.run(
        detach(qmp_path, netdev_id, tag=tag, device_timeout=device_timeout, socket_path=socket_path)
    )
