"""The client commands of `xsk-broker`: request, status, ping, probe, attach-nic, detach-nic,
revoke, detach. xsk_broker/cli.py puts them in one parser with the operator commands.

Contract that launch scripts rely on: every client command takes --socket (and honours
$XSK_BROKER_SOCKET), every reporting command takes --json, exit status 0 only on success,
and an error is one stderr line starting with the broker's error code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any, get_type_hints

from broker.errors import BrokerError, UsageError
from broker.protocol import Request, Status
from client.lease import Lease
from client.sync import Client

if TYPE_CHECKING:
    from client.probe import ProbeReport

EXIT_FAILURE = 1
STATUS_JSON = ("broker", "attachments", "leases", "lease_count", "leases_filtered",
               "leases_trimmed")  # fmt: skip


def add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="broker socket (default: $XSK_BROKER_SOCKET or /run/xsk-broker/broker.sock)",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


# Flags of `request` only: probe registers its own UMEM and attach-nic's consumer is QEMU,
# so the UMEM is known there, and both need sockets, not a map.
REQUEST_ONLY = ("umem_bytes", "handout")


def _add_request_flags(parser: argparse.ArgumentParser, *, request: bool = False) -> None:
    """One flag per protocol.Request field that callers set (REQUEST_ONLY ones for
    `request` alone)."""
    hints = get_type_hints(Request)
    for f in fields(Request):
        if not f.metadata["flag"] or (f.name in REQUEST_ONLY and not request):
            continue
        kind = hints[f.name]
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int if kind in (int, int | None) else str,
            required=f.default is MISSING,
            choices=f.metadata["choices"] or None,
            help=f.metadata["help"],
        )


def request_from(opts: argparse.Namespace, **fixed: Any) -> Request:
    """The Request the flags describe; unset flags take Request's defaults."""
    given = {f.name: getattr(opts, f.name, None) for f in fields(Request)} | fixed
    return Request(**{name: value for name, value in given.items() if value is not None})


PLACEHOLDER = re.compile(r"\{(netdev|sock-fds|dp-path|map-path|map-start-index)\}")


def substitute(args: Sequence[str], lease: Lease, netdev_id: str) -> list[str]:
    """Replace {netdev}, {sock-fds} and, for a map lease, {dp-path}, {map-path} and
    {map-start-index} in each argument, in one pass: a value put in (an interface or netdev
    id that itself reads `{sock-fds}`) is never substituted again."""
    info = lease.info
    values = {
        "netdev": lease.netdev_arg(netdev_id),
        "sock-fds": lease.sock_fds,
        "dp-path": info.dp_path,
        "map-path": info.map_pin,
        "map-start-index": str(info.start_queue),
    }
    return [PLACEHOLDER.sub(lambda found: values[found.group(1)], a) for a in args]


def cmd_request(opts: argparse.Namespace) -> int:
    """Get sockets, then become COMMAND with them inherited (so the lease follows it)."""
    if not opts.command:
        raise UsageError("give the command to run after --, e.g. -- qemu-system-x86_64 ...")
    lease = Client(opts.socket).lease(request_from(opts))
    argv = substitute(opts.command, lease, opts.id)
    lease.make_inheritable()
    os.environ.update(
        XSK_BROKER_NETDEV=lease.netdev_arg(opts.id),
        XSK_BROKER_SOCK_FDS=lease.sock_fds,
        XSK_BROKER_LEASE=lease.lease_id,
        XSK_BROKER_MODE=lease.mode,
        XSK_BROKER_DP_PATH=lease.info.dp_path,
        XSK_BROKER_MAP_PATH=lease.info.map_pin,
    )
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        lease.close()
        raise BrokerError(f"cannot run {argv[0]!r}: {exc.strerror}", errno=exc.errno) from None


def _print_status(status: Status) -> None:
    print(f"broker {status.broker.version} pid {status.broker.pid}")
    print(f"{'INTERFACE':<16}{'IFINDEX':>8}  {'MODE':<7}{'QUEUES':>7}  {'LINK':>6}  ADOPTED")
    for a in status.attachments:
        print(
            f"{a.ifname:<16}{a.ifindex:>8}  {a.mode:<7}{a.queue_count:>7}  "
            f"{a.link_id:>6}  {'yes' if a.adopted else 'no'}"
        )
    print(f"\n{'LEASE':<14}{'INTERFACE':<16}{'QUEUES':<12}{'CONSUMER':>9}{'UID':>7}  TAG")
    for lease in status.leases:
        queues = ",".join(str(q) for q in lease.queue_ids)
        print(
            f"{lease.lease_id:<14}{lease.ifname:<16}{queues:<12}"
            f"{lease.consumer_pid:>9}{lease.uid:>7}  {lease.tag or ''}"
        )
    if status.leases_filtered or status.leases_trimmed:
        print(
            f"\n{len(status.leases)} of {status.lease_count} lease(s) shown: "
            f"{status.leases_filtered} not yours or not matching the filters, "
            f"{status.leases_trimmed} left out for the reply's size (narrow with --ifname, "
            "--lease or --uid)"
        )


def cmd_status(opts: argparse.Namespace) -> int:
    status = Client(opts.socket).status(ifname=opts.ifname, lease_id=opts.lease, uid=opts.uid)
    if opts.json:
        body = status.to_wire()
        print(json.dumps({k: body[k] for k in STATUS_JSON}, indent=2))
    else:
        _print_status(status)
    return 0


def cmd_ping(opts: argparse.Namespace) -> int:
    reply = Client(opts.socket).ping()
    if opts.json:
        print(json.dumps(reply.to_wire()))
    else:
        print(f"broker {reply.broker} pid {reply.pid} is up")
    return 0


def _print_probe(report: ProbeReport) -> None:
    print(
        f"lease {report.lease_id}: {report.ifname} (ifindex {report.ifindex}) mode {report.mode}, "
        f"fds {report.fds}, request {report.request_ms:.2f} ms"
    )
    print(f"netdev: {report.netdev}")
    for q in report.queues:
        print(f"  queue {q.queue}: received {q.received}, sent {q.sent}")


def cmd_probe(opts: argparse.Namespace) -> int:
    """Bind every socket as QEMU would and move frames; exit 1 if a queue fell short."""
    from client.probe import announce_bound, probe  # its consumer maps rings: only here

    report = probe(
        Client(opts.socket),
        request_from(opts),
        frames=opts.frames,
        duration=opts.duration,
        expect=opts.expect,
        reply=opts.reply,
        send=opts.send,
        on_bound=announce_bound if opts.events else None,
    )
    if opts.json or opts.events:
        print(report.to_json(), flush=True)
    else:
        _print_probe(report)
    short = [q.queue for q in report.queues if q.received < opts.expect]
    if short:
        print(
            f"PROBE_SHORT: queue(s) {short} received fewer than {opts.expect} frames",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


def cmd_detach(opts: argparse.Namespace) -> int:
    reply = Client(opts.socket).detach(opts.ifname, opts.force)
    if opts.json:
        print(json.dumps(reply.to_wire()))
    else:
        state = "detached" if reply.was_attached else "had no program attached"
        print(f"{reply.ifname}: {state}")
    return 0


def _netdev_id(opts: argparse.Namespace) -> str:
    return str(opts.id or f"xsk-{opts.ifname}")


def cmd_attach_nic(opts: argparse.Namespace) -> int:
    """Hot-plug an AF_XDP NIC into a running QEMU over QMP or libvirt (QEMU becomes the
    consumer)."""
    from client import qmp

    device = None if opts.device == "none" else opts.device
    if opts.mac and device:
        device = f"{device},mac={opts.mac}"
    if opts.libvirt:
        from client import libvirt

        result = libvirt.attach_nic(
            opts.libvirt,
            request_from(opts),
            _netdev_id(opts),
            uri=opts.connect,
            device=device,
            socket_path=opts.socket,
        )
    else:
        result = qmp.attach_nic(
            opts.qmp, request_from(opts), _netdev_id(opts), device=device, socket_path=opts.socket
        )
    report = {
        "netdev_id": result.netdev_id,
        "device_id": result.device_id,
        "fd_names": result.fd_names,
        "netdev_add": result.netdev_args,
        "lease_id": result.lease.lease_id,
        "mode": result.lease.mode,
        "queue_ids": result.lease.queue_ids,
    }
    if opts.json:
        print(json.dumps(report))
    else:
        device = f", device {result.device_id}" if result.device_id else ""
        print(
            f"attached netdev {result.netdev_id}{device}: {result.lease.ifname} queues "
            f"{result.lease.queue_ids} ({result.lease.mode}), lease {result.lease.lease_id}"
        )
    return 0


def cmd_detach_nic(opts: argparse.Namespace) -> int:
    if not (opts.id or opts.ifname):
        raise UsageError("give --id (or the --ifname given to attach-nic)")
    if opts.libvirt:
        from client import libvirt

        result = libvirt.detach_nic(
            opts.libvirt, _netdev_id(opts), uri=opts.connect, tag=opts.tag, socket_path=opts.socket
        )
    else:
        from client import qmp

        result = qmp.detach_nic(opts.qmp, _netdev_id(opts), tag=opts.tag, socket_path=opts.socket)
    if opts.json:
        print(json.dumps(result.__dict__))
    else:
        released = "released" if result.device_released else "not acknowledged by the guest"
        device = f"device {released}" if result.device_found else "no device"
        netdev = "removed" if result.netdev_removed else "absent"
        ended = ", ".join(result.leases_released) or "none"
        print(f"{result.netdev_id}: {device}, netdev {netdev}, lease(s) ended: {ended}")
    return 0


def cmd_revoke(opts: argparse.Namespace) -> int:
    reply = Client(opts.socket).revoke(opts.lease_id)
    if opts.json:
        print(json.dumps(reply.to_wire()))
    else:
        print(f"revoked lease {reply.lease_id}: queues {reply.queue_ids} back to the stack")
    return 0


def _add_monitor_flags(parser: argparse.ArgumentParser) -> None:
    """Which QEMU: its QMP socket, or a libvirt domain (and libvirt's URI)."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--qmp", metavar="PATH", help="QEMU's QMP unix socket")
    which.add_argument("--libvirt", metavar="DOMAIN", help="a running libvirt domain")
    parser.add_argument(
        "--connect", metavar="URI", help="libvirt URI with --libvirt (default: libvirt's own)"
    )


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """The client commands, each with --socket and, where it reports, --json."""
    req = sub.add_parser(
        "request",
        help="get sockets, then exec COMMAND with them",
        description="Placeholders in COMMAND: {netdev} (the whole -netdev value), "
        "{dp-path}, {map-path} and {map-start-index} (map leases, --handout map) and "
        "{sock-fds} (a:b:c). Also exported as XSK_BROKER_NETDEV, XSK_BROKER_SOCK_FDS, "
        "XSK_BROKER_DP_PATH and XSK_BROKER_MAP_PATH.",
    )
    add_socket(req)
    _add_request_flags(req, request=True)
    req.add_argument("--id", default="net0", help="netdev id in {netdev} (default net0)")
    req.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    req.set_defaults(func=cmd_request)

    status = sub.add_parser(
        "status",
        help="attachments and leases",
        description="Lists your own leases (an admin's: those of the interfaces it "
        "administers; root's: all), narrowed by the filters given.",
    )
    add_socket(status)
    add_json(status)
    status.add_argument("--ifname", help="only this interface")
    status.add_argument("--lease", metavar="ID", help="only this lease")
    status.add_argument("--uid", type=int, help="only leases this uid asked for or consumes")
    status.set_defaults(func=cmd_status)

    prb = sub.add_parser(
        "probe", help="get sockets, bind them as QEMU would, send and count frames"
    )
    add_socket(prb)
    add_json(prb)
    _add_request_flags(prb)
    prb.add_argument("--frames", type=int, default=256, help="UMEM frames per queue (4 KiB)")
    prb.add_argument("--duration", type=float, default=2.0, help="seconds to listen")
    prb.add_argument("--expect", type=int, default=0, help="fail unless each queue gets N")
    prb.add_argument("--send", type=int, default=1, help="test frames to send per queue")
    prb.add_argument("--reply", action="store_true", help="answer each frame received")
    prb.add_argument("--events", action="store_true", help="print a JSON line once bound")
    prb.set_defaults(func=cmd_probe)

    det = sub.add_parser("detach", help="remove the program and pins from an interface (admin)")
    add_socket(det)
    add_json(det)
    det.add_argument("--ifname", required=True)
    det.add_argument("--force", action="store_true", help="even with live leases (ends them)")
    det.set_defaults(func=cmd_detach)

    att = sub.add_parser(
        "attach-nic",
        aliases=["attach"],
        help="hot-plug an AF_XDP NIC into a running QEMU over QMP or libvirt ('attach' is "
        "the old name)",
    )
    add_socket(att)
    add_json(att)
    _add_request_flags(att)
    _add_monitor_flags(att)
    att.add_argument("--id", help="netdev id (the device gets ID-dev; default xsk-IFNAME)")
    att.add_argument(
        "--device", default="virtio-net-pci", help="device_add driver[,opts], or 'none'"
    )
    att.add_argument("--mac", help="the NIC's MAC address (added to --device as mac=)")
    att.set_defaults(func=cmd_attach_nic)

    dnic = sub.add_parser(
        "detach-nic", help="remove a hot-plugged NIC (device and netdev) and end its lease"
    )
    add_json(dnic)
    _add_monitor_flags(dnic)
    add_socket(dnic)
    dnic.add_argument("--id", help="netdev id given to attach-nic")
    dnic.add_argument("--ifname", help="instead of --id: the --ifname given to attach-nic")
    dnic.add_argument("--tag", help="tag given to attach-nic, if not the default (the id)")
    dnic.set_defaults(func=cmd_detach_nic)

    rev = sub.add_parser("revoke", help="end a lease now and empty its slots (admin)")
    add_socket(rev)
    add_json(rev)
    rev.add_argument("lease_id", metavar="LEASE")
    rev.set_defaults(func=cmd_revoke)

    ping = sub.add_parser("ping", help="is the broker up")
    add_socket(ping)
    add_json(ping)
    ping.set_defaults(func=cmd_ping)
