"""Hot-plug broker sockets into a running QEMU over QMP, and take them out again.

QEMU's own `qemu.qmp` library carries the fds: `QMPClient.send_fd_scm()` sends one fd with
SCM_RIGHTS on the monitor socket, and the next `getfd` names it. `sock-fds` of an af-xdp
netdev then takes those names. Every step that succeeded is undone in reverse when a later
one fails, and the QMP error text is raised verbatim as QmpError.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.events import EventListener

from broker.protocol import BrokerError, LeaseInfo, NoSuchLease
from client.aio import AsyncClient
from client.lease import Lease

DEFAULT_DEVICE = "virtio-net-pci"
# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class QmpError(BrokerError):
    """QEMU refused a command; message is QEMU's text verbatim, details name the command."""

    code: ClassVar[str] = "QMP_ERROR"
    default_errno: ClassVar[int] = errno_mod.EIO


class QmpSchemaError(QmpError):
    """netdev_add arguments that QEMU's QAPI schema would refuse; details list each problem."""

    code: ClassVar[str] = "QMP_SCHEMA"
    default_errno: ClassVar[int] = errno_mod.EINVAL


@dataclass(frozen=True)
class HotplugResult:
    """What hotplug() left in QEMU: the netdev, its device (None if not asked) and the lease."""

    netdev_id: str
    device_id: str | None
    fd_names: list[str]
    netdev_args: dict
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


@dataclass
class _Undo:
    """Commands that reverse what a hot-plug did so far, run last-first."""

    steps: list[tuple[str, dict]] = field(default_factory=list)

    async def run(self, qmp: QMPClient) -> list[dict]:
        """Run every step even if some fail; a name QEMU already consumed is not an error."""
        report = []
        for command, args in reversed(self.steps):
            try:
                await qmp.execute(command, args)
                report.append({"command": command, "args": args, "ok": True})
            except (QMPError, OSError) as exc:
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


async def _execute(qmp: QMPClient, command: str, args: dict | None = None) -> Any:
    try:
        return await qmp.execute(command, args)
    except (QMPError, OSError) as exc:
        raise _qmp_error(command, exc) from exc


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


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


async def hotplug(
    qmp: str | QMPClient, lease: Lease, netdev_id: str, device: str | None = DEFAULT_DEVICE
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
    async with session(qmp) as (client, _pid):
        try:
            for fd, name in zip(lease.fds, names, strict=True):
                try:
                    client.send_fd_scm(fd)
                except (QMPError, OSError) as exc:
                    raise _qmp_error("getfd", exc) from exc
                await _execute(client, "getfd", {"fdname": name})
                undo.steps.append(("closefd", {"fdname": name}))
            await _execute(client, "netdev_add", netdev_args)
            undo.steps.append(("netdev_del", {"id": netdev_id}))
            if dev_args:
                await _execute(client, "device_add", dev_args)
        except BaseException as exc:
            report = await undo.run(client)
            if isinstance(exc, QmpError):
                exc.details["rolled_back"] = report
            raise
    return HotplugResult(
        netdev_id, dev_args["id"] if dev_args else None, names, netdev_args, lease.info
    )


async def _released(events: EventListener, dev_id: str) -> None:
    while (await events.get()).get("data", {}).get("device") != dev_id:
        pass


async def unplug(
    qmp: str | QMPClient, netdev_id: str, *, device_timeout: float = 10.0
) -> UnplugResult:
    """Remove the NIC hotplug() made: device_del, wait for the guest, then netdev_del.

    The netdev goes even if the guest has not released the device within device_timeout
    (device_released is then False), so the sockets are freed either way.
    """
    dev_id = device_id(netdev_id)
    async with session(qmp) as (client, _pid):
        with client.listener("DEVICE_DELETED") as events:
            device_found = await _delete(client, "device_del", dev_id)
            released = False
            if device_found:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(device_timeout):
                        await _released(events, dev_id)
                        released = True
        netdev_removed = await _delete(client, "netdev_del", netdev_id)
    if not (device_found or netdev_removed):
        raise QmpError(
            f"QEMU has neither a netdev {netdev_id!r} nor a device {dev_id!r}",
            errno=errno_mod.ENOENT,
        )
    return UnplugResult(netdev_id, device_found, released, netdev_removed)


async def _delete(client: QMPClient, command: str, object_id: str) -> bool:
    """Run a *_del command; False when QEMU says there is no such object."""
    try:
        await client.execute(command, {"id": object_id})
    except ExecuteError as exc:
        if exc.error_class == "DeviceNotFound":
            return False
        raise _qmp_error(command, exc) from exc
    except (QMPError, OSError) as exc:
        raise _qmp_error(command, exc) from exc
    return True


async def attach(
    qmp: str | QMPClient,
    ifname: str,
    queues: int,
    netdev_id: str,
    *,
    start_queue: int = 0,
    mode: str = "auto",
    device: str | None = DEFAULT_DEVICE,
    tag: str | None = None,
    consumer_pid: int | None = None,
    socket_path: str | None = None,
) -> HotplugResult:
    """Request sockets from the broker for QEMU and hot-plug them as netdev_id.

    The lease's consumer is QEMU (its pid comes from the QMP socket's SO_PEERCRED, or pass
    consumer_pid with a QMPClient), so the lease lives as long as QEMU. On failure the lease
    is released again. Our copies of the fds are always closed.
    """
    check_id(netdev_id)
    async with session(qmp) as (client, pid):
        broker = AsyncClient(socket_path)
        lease = await broker.request(
            ifname, queues, start_queue, mode, tag or netdev_id, consumer_pid or pid
        )
        with lease:
            try:
                return await hotplug(client, lease, netdev_id, device)
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
    ifname: str,
    queues: int,
    netdev_id: str,
    *,
    start_queue: int = 0,
    mode: str = "auto",
    device: str | None = DEFAULT_DEVICE,
    tag: str | None = None,
    socket_path: str | None = None,
) -> HotplugResult:
    """attach() for synchronous callers such as `xsk-broker attach`."""
    return asyncio.run(
        attach(
            qmp_path,
            ifname,
            queues,
            netdev_id,
            start_queue=start_queue,
            mode=mode,
            device=device,
            tag=tag,
            socket_path=socket_path,
        )
    )


async def detach(
    qmp: str | QMPClient,
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
    async with session(qmp) as (client, pid):
        result = await unplug(client, netdev_id, device_timeout=device_timeout)
    qemu_pid = consumer_pid or pid
    if qemu_pid is None:
        raise QmpError("give consumer_pid with a QMPClient: the lease is found by QEMU's pid")
    broker = AsyncClient(socket_path)
    try:
        ended = [
            lease["lease_id"]
            for lease in (await broker.status())["leases"]
            if lease["tag"] == (tag or netdev_id)
            and lease["consumer_pid"] == qemu_pid
            and lease["uid"] == os.geteuid()
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


# The af-xdp part of qapi/net.json (QEMU 8.2; map-path and map-start-index since 10.1) in the
# shape query-qmp-schema reports, so one validator serves QEMU's schema and this one.
def _builtin(name: str, json_type: str) -> dict:
    return {"name": name, "meta-type": "builtin", "json-type": json_type}


def _enum(name: str, values: list[str]) -> dict:
    return {"name": name, "meta-type": "enum", "values": values}


def _member(name: str, kind: str, optional: bool = True) -> dict:
    return (
        {"name": name, "type": kind, "default": None} if optional else {"name": name, "type": kind}
    )


DOCUMENTED_SCHEMA: list[dict] = [
    {"name": "netdev_add", "meta-type": "command", "arg-type": "Netdev", "ret-type": "any"},
    {
        "name": "Netdev",
        "meta-type": "object",
        "members": [_member("id", "str", False), _member("type", "NetClientDriver", False)],
        "tag": "type",
        "variants": [{"case": "af-xdp", "type": "NetdevAFXDPOptions"}],
    },
    _enum("NetClientDriver", ["af-xdp"]),
    _enum("AFXDPMode", ["native", "skb"]),
    {
        "name": "NetdevAFXDPOptions",
        "meta-type": "object",
        "members": [
            _member("ifname", "str", False),
            _member("mode", "AFXDPMode"),
            _member("force-copy", "bool"),
            _member("queues", "int"),
            _member("start-queue", "int"),
            _member("inhibit", "bool"),
            _member("sock-fds", "str"),
            _member("map-path", "str"),
            _member("map-start-index", "int32"),
        ],
    },
    _builtin("str", "string"),
    _builtin("int", "int"),
    _builtin("int32", "int"),
    _builtin("bool", "boolean"),
    _builtin("any", "value"),
]

_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "value": lambda v: True,
}


def _check(types: dict[str, dict], value: Any, type_name: str, where: str) -> list[str]:
    """Why value is not of QAPI type type_name (an empty list when it is)."""
    info = types.get(type_name)
    if info is None:
        return [f"{where}: the schema has no type {type_name!r}"]
    meta = info["meta-type"]
    if meta == "builtin":
        ok = _JSON_TYPES[info["json-type"]](value)
        return [] if ok else [f"{where}: {value!r} is not a JSON {info['json-type']}"]
    if meta == "enum":
        values = info.get("values") or [m["name"] for m in info.get("members", [])]
        return [] if value in values else [f"{where}: {value!r} is not one of {', '.join(values)}"]
    if meta == "array":
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not an array"]
        element = info["element-type"]
        return [p for i, v in enumerate(value) for p in _check(types, v, element, f"{where}[{i}]")]
    if meta == "alternate":
        if any(not _check(types, value, m["type"], where) for m in info["members"]):
            return []
        return [f"{where}: {value!r} fits none of the alternatives"]
    if meta == "object":
        return _check_object(types, value, info, where)
    return [f"{where}: cannot check a {meta}"]


def _members(types: dict[str, dict], value: dict, info: dict) -> list[dict]:
    """The object's members plus those of the variant its tag value selects."""
    found = list(info.get("members", []))
    tag = info.get("tag")
    for variant in info.get("variants", []):
        if tag is not None and value.get(tag) == variant["case"]:
            found += _members(types, value, types.get(variant["type"], {}))
    return found


def _check_object(types: dict[str, dict], value: Any, info: dict, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    members = {m["name"]: m for m in _members(types, value, info)}
    problems = [f"{where}: unknown member {name!r}" for name in sorted(set(value) - set(members))]
    for name, member in members.items():
        if name in value:
            problems += _check(types, value[name], member["type"], f"{where}.{name}")
        elif "default" not in member:
            problems.append(f"{where}: required member {name!r} is missing")
    return problems


def validate_netdev_args(args: dict, schema: list[dict] = DOCUMENTED_SCHEMA) -> None:
    """Raise QmpSchemaError unless args are what netdev_add takes in this schema.

    schema is a query-qmp-schema reply (QEMU's own, when it has af-xdp) or
    DOCUMENTED_SCHEMA; names in QEMU's reply are masked numbers, so types are followed
    from the netdev_add command rather than looked up by name.
    """
    types = {entity["name"]: entity for entity in schema}
    command = types.get("netdev_add", {"arg-type": "netdev_add arguments"})
    problems = _check(types, args, command["arg-type"], "netdev_add")
    if problems:
        raise QmpSchemaError("; ".join(problems), details={"problems": problems, "args": args})


def reports_afxdp(schema: list[dict]) -> bool:
    """Whether a query-qmp-schema reply knows netdev type af-xdp (QEMU >= 8.2 with it built)."""
    try:
        validate_netdev_args({"id": "probe", "type": "af-xdp", "ifname": "lo"}, schema)
    except QmpSchemaError:
        return False
    return True


async def query_schema(qmp: str | QMPClient) -> list[dict]:
    """QEMU's own QAPI schema (query-qmp-schema), for validate_netdev_args()."""
    async with session(qmp) as (client, _pid):
        return await _execute(client, "query-qmp-schema")
