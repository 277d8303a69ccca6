"""Hot-plug broker sockets into a libvirt domain's QEMU, and take them out again.

libvirt has no af-xdp interface type, but since 8.2 it passes fds to a running domain's
QEMU with a monitor command (virDomainQemuMonitorCommandWithFiles, `virsh
qemu-monitor-command --pass-fds`). LibvirtMonitor carries client.qmp's hot-plug flow over
that, so the QMP socket and libvirt run the same steps and the same rollback. libvirt keeps
QEMU's monitor to itself, so this is the only way in; it marks the domain "tainted:
custom-monitor", and libvirt's own view of the domain does not list these NICs.

The lease's consumer is the domain's QEMU process, so it ends when QEMU exits. libvirt's API
does not say QEMU's pid: it is the process whose command line carries `-uuid UUID` of the
domain, as libvirt starts every QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import itertools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from broker.errors import LocalError
from broker.protocol import Request
from client import qmp

POLL_SECONDS = 0.1


class LibvirtError(LocalError):
    """libvirt refused a call (no such domain, not running, no access); message is
    libvirt's text."""

    code = "LIBVIRT_ERROR"
    default_errno = errno_mod.EIO


def default_id(ifname: str) -> str:
    """The netdev id attach and detach use when none is given."""
    return f"xsk-{ifname}"


@dataclass(frozen=True)
class LibvirtMonitor:
    """A running domain's QEMU monitor, through libvirt (client.qmp.Monitor)."""

    domain: libvirt.virDomain
    pid: int | None = None

    async def execute(self, command: str, args: Mapping[str, object] | None = None) -> object:
        return await asyncio.to_thread(self._command, command, args, [])

    async def getfd(self, name: str, fd: int) -> None:
        await asyncio.to_thread(self._command, "getfd", {"fdname": name}, [fd])

    @contextlib.asynccontextmanager
    async def deletion(self, dev_id: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """libvirt takes QEMU's events itself, so the device's disappearance from
        /machine/peripheral is polled instead."""

        async def released() -> None:
            while dev_id in await self._peripherals():
                await asyncio.sleep(POLL_SECONDS)

        yield released

    async def _peripherals(self) -> set[str]:
        listed = await self.execute("qom-list", {"path": "/machine/peripheral"})
        if not isinstance(listed, list):
            raise qmp.QmpError(f"qom-list returned {listed!r}, not a list")
        return {str(item.get("name")) for item in listed if isinstance(item, dict)}

    def _command(self, command: str, args: Mapping[str, object] | None, files: list[int]) -> object:
        """One QMP command (with files, sent by libvirt with SCM_RIGHTS); QEMU's error
        reply becomes QmpError as on a QMP socket."""
        body: dict[str, object] = {"execute": command}
        if args:
            body["arguments"] = dict(args)
        text = json.dumps(body)
        try:
            if files:
                reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(self.domain, text, files, 0)
            else:
                reply = libvirt_qemu.qemuMonitorCommand(self.domain, text, 0)
        except libvirt.libvirtError as exc:
            raise qmp.QmpError(
                f"{command}: {exc.get_error_message()}",
                details={"command": command, "libvirt_code": exc.get_error_code()},
            ) from exc
        answer = json.loads(reply)
        if "error" in answer:
            error = answer["error"]
            raise qmp.QmpError(
                str(error.get("desc")), details={"command": command, "class": error.get("class")}
            )
        return answer.get("return")


def qemu_pid(domain: libvirt.virDomain) -> int:
    """The pid of the domain's QEMU: the one process started with its `-uuid`."""
    uuid = domain.UUIDString()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # exited, or not ours to read
        if any(a == b"-uuid" and b == uuid.encode() for a, b in itertools.pairwise(argv)):
            found.append(int(entry.name))
    if len(found) != 1:
        raise LibvirtError(
            f"domain {domain.name()} ({uuid}): found {len(found)} QEMU processes with its "
            "-uuid, not one; run this on the domain's host, in libvirtd's pid namespace",
            errno=errno_mod.ESRCH,
        )
    return found[0]


def _ignore(_ctx: object, _error: object) -> None:
    """libvirt's error handler: its errors arrive as exceptions, not printed on stderr."""


def connect(uri: str | None) -> libvirt.virConnect:
    """A connection to libvirt at uri (libvirt's default if None), libvirt kept quiet."""
    libvirt.registerErrorHandler(_ignore, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(
            f"cannot connect to libvirt at {uri or 'the default URI'}: {exc.get_error_message()}",
            errno=errno_mod.ECONNREFUSED,
        ) from None


@contextlib.contextmanager
def running_domain(name: str, uri: str | None) -> Iterator[LibvirtMonitor]:
    """A monitor of the running domain name on libvirt at uri (libvirt's default if None)."""
    conn = connect(uri)
    try:
        try:
            domain = conn.lookupByName(name)
            active = domain.isActive()
        except libvirt.libvirtError as exc:
            raise LibvirtError(exc.get_error_message(), errno=errno_mod.ENOENT) from None
        if not active:
            raise LibvirtError(
                f"domain {name} is not running: start it first (virsh start {name})",
                errno=errno_mod.ESRCH,
            )
        yield LibvirtMonitor(domain, qemu_pid(domain))
    finally:
        conn.close()


def attach_nic(
    domain: str,
    request: Request,
    netdev_id: str,
    *,
    uri: str | None = None,
    device: str | None = qmp.DEFAULT_DEVICE,
    socket_path: str | None = None,
) -> qmp.HotplugResult:
    """client.qmp.attach() into the running libvirt domain; QEMU is the lease's consumer."""
    with running_domain(domain, uri) as monitor:
        return asyncio.run(
            qmp.attach(monitor, request, netdev_id, device=device, socket_path=socket_path)
        )


def detach_nic(
    domain: str,
    netdev_id: str,
    *,
    uri: str | None = None,
    tag: str | None = None,
    device_timeout: float = 10.0,
    socket_path: str | None = None,
) -> qmp.UnplugResult:
    """client.qmp.detach() from the running libvirt domain: device, netdev, then lease."""
    with running_domain(domain, uri) as monitor:
        return asyncio.run(
            qmp.detach(
                monitor,
                netdev_id,
                tag=tag,
                device_timeout=device_timeout,
                socket_path=socket_path,
            )
        )
