"""The `xsk-broker` command line.

Contract that launch scripts rely on: every client command takes --socket (and honours
$XSK_BROKER_SOCKET), every reporting command takes --json, exit status 0 only on success,
and an error is one stderr line starting with the broker's error code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from broker.protocol import MODES, BrokerError
from client.lease import Lease
from client.probe import ProbeReport, announce_bound, probe
from client.sync import Client

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(BrokerError):
    """The command line itself is wrong; exit status 2 like argparse's own errors."""

    code = "USAGE"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line with a code like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"USAGE: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="broker socket (default: $XSK_BROKER_SOCKET or /run/xsk-broker/broker.sock)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_lease_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ifname", required=True, help="interface to take queues of")
    parser.add_argument("--queues", type=int, required=True, help="number of queues")
    parser.add_argument("--start-queue", type=int, default=0, help="first queue (default 0)")
    parser.add_argument("--mode", choices=MODES, default="auto", help="XDP attach mode wish")
    parser.add_argument("--tag", help="free text shown in status and audit (e.g. the VM name)")


def substitute(args: Sequence[str], lease: Lease, netdev_id: str) -> list[str]:
    """Replace {netdev} and {sock-fds} in each argument."""
    netdev = lease.netdev_arg(netdev_id)
    return [a.replace("{netdev}", netdev).replace("{sock-fds}", lease.sock_fds) for a in args]


def cmd_request(opts: argparse.Namespace) -> int:
    """Get sockets, then become COMMAND with them inherited (so the lease follows it)."""
    if not opts.command:
        raise UsageError("give the command to run after --, e.g. -- qemu-system-x86_64 ...")
    lease = Client(opts.socket).request(
        opts.ifname, opts.queues, opts.start_queue, opts.mode, opts.tag, None, opts.umem_bytes
    )
    argv = substitute(opts.command, lease, opts.id)
    lease.make_inheritable()
    os.environ.update(
        XSK_BROKER_NETDEV=lease.netdev_arg(opts.id),
        XSK_BROKER_SOCK_FDS=lease.sock_fds,
        XSK_BROKER_LEASE=lease.lease_id,
        XSK_BROKER_MODE=lease.mode,
    )
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        lease.close()
        raise BrokerError(f"cannot run {argv[0]!r}: {exc.strerror}", errno=exc.errno) from None


def _print_status(status: dict) -> None:
    attachments, leases = status["attachments"], status["leases"]
    print(f"broker {status['broker']['version']} pid {status['broker']['pid']}")
    print(f"{'INTERFACE':<16}{'IFINDEX':>8}  {'MODE':<7}{'QUEUES':>7}  {'LINK':>6}  ADOPTED")
    for a in attachments:
        print(
            f"{a['ifname']:<16}{a['ifindex']:>8}  {a['mode']:<7}{a['queue_count']:>7}  "
            f"{a['link_id']:>6}  {'yes' if a['adopted'] else 'no'}"
        )
    print(f"\n{'LEASE':<14}{'INTERFACE':<16}{'QUEUES':<12}{'CONSUMER':>9}{'UID':>7}  TAG")
    for lease in leases:
        queues = ",".join(str(q) for q in lease["queue_ids"])
        print(
            f"{lease['lease_id']:<14}{lease['ifname']:<16}{queues:<12}"
            f"{lease['consumer_pid']:>9}{lease['uid']:>7}  {lease['tag'] or ''}"
        )


def cmd_status(opts: argparse.Namespace) -> int:
    status = Client(opts.socket).status()
    if opts.json:
        print(json.dumps({k: status[k] for k in ("broker", "attachments", "leases")}, indent=2))
    else:
        _print_status(status)
    return 0


def cmd_ping(opts: argparse.Namespace) -> int:
    reply = Client(opts.socket).ping()
    if opts.json:
        print(json.dumps({"broker": reply["broker"], "pid": reply["pid"]}))
    else:
        print(f"broker {reply['broker']} pid {reply['pid']} is up")
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
    report = probe(
        Client(opts.socket),
        opts.ifname,
        opts.queues,
        opts.start_queue,
        opts.mode,
        frames=opts.frames,
        tag=opts.tag,
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
        print(json.dumps({"ifname": reply["ifname"], "was_attached": reply["was_attached"]}))
    else:
        state = "detached" if reply["was_attached"] else "had no program attached"
        print(f"{reply['ifname']}: {state}")
    return 0


def cmd_attach(opts: argparse.Namespace) -> int:
    """Hot-plug an AF_XDP NIC into a running QEMU over QMP (QEMU becomes the consumer)."""
    from client import qmp

    result = qmp.attach_nic(
        opts.qmp,
        opts.ifname,
        opts.queues,
        opts.id,
        start_queue=opts.start_queue,
        mode=opts.mode,
        device=None if opts.device == "none" else opts.device,
        tag=opts.tag,
        socket_path=opts.socket,
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
    from client import qmp

    result = qmp.detach_nic(opts.qmp, opts.id, tag=opts.tag, socket_path=opts.socket)
    if opts.json:
        print(json.dumps(result.__dict__))
    else:
        released = "released" if result.device_released else "not acknowledged by the guest"
        device = f"device {released}" if result.device_found else "no device"
        netdev = "removed" if result.netdev_removed else "absent"
        ended = ", ".join(result.leases_released) or "none"
        print(f"{opts.id}: {device}, netdev {netdev}, lease(s) ended: {ended}")
    return 0


def cmd_revoke(opts: argparse.Namespace) -> int:
    reply = Client(opts.socket).revoke(opts.lease_id)
    if opts.json:
        print(json.dumps({"lease_id": reply["lease_id"], "queue_ids": reply["queue_ids"]}))
    else:
        print(f"revoked lease {reply['lease_id']}: queues {reply['queue_ids']} back to the stack")
    return 0


def cmd_policy_check(opts: argparse.Namespace) -> int:
    from broker.policy import policy_check_main

    return policy_check_main(opts.file, opts.as_user)


def cmd_doctor(opts: argparse.Namespace) -> int:
    from client.doctor import doctor_main

    return doctor_main(opts)


def cmd_install_units(opts: argparse.Namespace) -> int:
    """Put units, polkit actions and examples in place; print what makes them live."""
    from broker import units

    exec_path = opts.exec_path or os.path.abspath(sys.argv[0])
    try:
        written = units.install_units(Path(opts.prefix), exec_path)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot install units under {opts.prefix}: {exc}") from None
    if opts.json:
        print(
            json.dumps(
                {
                    "installed": [str(p) for p in written],
                    "then": [" ".join(c) for c in units.POST_INSTALL],
                }
            )
        )
    else:
        print("\n".join(str(p) for p in written))
        print("then run:\n  " + "\n  ".join(" ".join(c) for c in units.POST_INSTALL))
    return 0


def cmd_demo(opts: argparse.Namespace) -> int:
    from client import demo

    return demo.main(opts.queues, opts.mode, opts.json)


def cmd_serve(opts: argparse.Namespace) -> int:
    from broker import daemon

    return daemon.main(opts)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xsk-broker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the privileged broker daemon")
    _add_socket(serve)
    serve.add_argument("--pin-dir", type=Path, help="bpffs directory for pins")
    serve.add_argument("--state-dir", type=Path, help="runtime state (default /run/xsk-broker)")
    serve.add_argument("--group", help="group that may connect to the socket (mode 0660)")
    serve.add_argument("--idle-exit", type=float, help="exit after this many idle seconds")
    serve.add_argument("--allow-root", action="store_true", help="run as full root anyway")
    serve.add_argument(
        "--policy", type=Path, help="policy file (default /etc/xsk-broker/policy.toml)"
    )
    serve.add_argument("--max-connections", type=int, default=1024, help="open at once")
    serve.add_argument(
        "--max-connections-per-uid", type=int, default=128, help="open at once per uid"
    )
    serve.add_argument(
        "--rate-per-uid", type=float, default=200.0, help="messages a second per uid"
    )
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=cmd_serve)

    req = sub.add_parser(
        "request",
        help="get sockets, then exec COMMAND with them",
        description="Placeholders in COMMAND: {netdev} (the whole -netdev value) and "
        "{sock-fds} (a:b:c). Also exported as XSK_BROKER_NETDEV and XSK_BROKER_SOCK_FDS.",
    )
    _add_socket(req)
    _add_lease_args(req)
    # Only here: probe registers its own small UMEM and attach's consumer is QEMU (32 MiB).
    req.add_argument(
        "--umem-bytes",
        type=int,
        help="UMEM the consumer will register per queue "
        "(default QEMU's 32 MiB; checked against its locked-memory limit)",
    )
    req.add_argument("--id", default="net0", help="netdev id in {netdev} (default net0)")
    req.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    req.set_defaults(func=cmd_request)

    status = sub.add_parser("status", help="attachments and leases")
    _add_socket(status)
    _add_json(status)
    status.set_defaults(func=cmd_status)

    prb = sub.add_parser(
        "probe", help="get sockets, bind them as QEMU would, send and count frames"
    )
    _add_socket(prb)
    _add_json(prb)
    _add_lease_args(prb)
    prb.add_argument("--frames", type=int, default=256, help="UMEM frames per queue (4 KiB)")
    prb.add_argument("--duration", type=float, default=2.0, help="seconds to listen")
    prb.add_argument("--expect", type=int, default=0, help="fail unless each queue gets N")
    prb.add_argument("--send", type=int, default=1, help="test frames to send per queue")
    prb.add_argument("--reply", action="store_true", help="answer each frame received")
    prb.add_argument("--events", action="store_true", help="print a JSON line once bound")
    prb.set_defaults(func=cmd_probe)

    det = sub.add_parser("detach", help="remove the program and pins from an interface (admin)")
    _add_socket(det)
    _add_json(det)
    det.add_argument("--ifname", required=True)
    det.add_argument("--force", action="store_true", help="even with live leases (ends them)")
    det.set_defaults(func=cmd_detach)

    att = sub.add_parser("attach", help="hot-plug an AF_XDP NIC into a running QEMU over QMP")
    _add_socket(att)
    _add_json(att)
    _add_lease_args(att)
    att.add_argument("--qmp", required=True, metavar="PATH", help="QEMU's QMP unix socket")
    att.add_argument("--id", required=True, help="netdev id (the device gets ID-dev)")
    att.add_argument(
        "--device", default="virtio-net-pci", help="device_add driver[,opts], or 'none'"
    )
    att.set_defaults(func=cmd_attach)

    dnic = sub.add_parser(
        "detach-nic", help="remove a hot-plugged NIC (device and netdev) and end its lease"
    )
    _add_json(dnic)
    dnic.add_argument("--qmp", required=True, metavar="PATH", help="QEMU's QMP unix socket")
    _add_socket(dnic)
    dnic.add_argument("--id", required=True, help="netdev id given to attach")
    dnic.add_argument("--tag", help="tag given to attach, if not the default (the id)")
    dnic.set_defaults(func=cmd_detach_nic)

    rev = sub.add_parser("revoke", help="end a lease now and empty its slots (admin)")
    _add_socket(rev)
    _add_json(rev)
    rev.add_argument("lease_id", metavar="LEASE")
    rev.set_defaults(func=cmd_revoke)

    pol = sub.add_parser("policy", help="policy file tools")
    pol_sub = pol.add_subparsers(dest="policy_cmd", required=True, parser_class=_Parser)
    chk = pol_sub.add_parser("check", help="validate a policy file and explain it for a user")
    chk.add_argument("file", nargs="?", help="policy file (default /etc/xsk-broker/policy.toml)")
    chk.add_argument("--as", dest="as_user", metavar="USER", help="explain what USER may have")
    chk.set_defaults(func=cmd_policy_check)

    doc = sub.add_parser("doctor", help="check kernel, bpffs, broker, socket, policy, memlock")
    _add_socket(doc)
    _add_json(doc)
    doc.add_argument("--policy", help="policy file to check (default the broker's)")
    doc.add_argument("--pid", type=int, help="consumer pid whose memlock limit to check")
    doc.add_argument("--queues", type=int, default=1, help="queues that consumer would take")
    doc.set_defaults(func=cmd_doctor)

    ins = sub.add_parser(
        "install-units", help="install the systemd units, polkit actions, examples"
    )
    _add_json(ins)
    ins.add_argument("--prefix", default="/", help="root to install under (default /)")
    ins.add_argument("--exec-path", help="ExecStart= path (default: this xsk-broker)")
    ins.set_defaults(func=cmd_install_units)

    dmo = sub.add_parser(
        "demo", help="the whole product on a private veth pair (root; cleans up after itself)"
    )
    _add_json(dmo)
    dmo.add_argument("--queues", type=int, default=4, help="veth queues (default 4)")
    dmo.add_argument("--mode", choices=MODES, default="auto", help="XDP mode wish")
    dmo.set_defaults(func=cmd_demo)

    ping = sub.add_parser("ping", help="is the broker up")
    _add_socket(ping)
    _add_json(ping)
    ping.set_defaults(func=cmd_ping)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if getattr(opts, "command", None) and opts.command[0] == "--":
        opts.command = opts.command[1:]
    func: Callable[[argparse.Namespace], int] = opts.func
    try:
        return func(opts)
    except BrokerError as error:
        print(f"{error.code}: {error.message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print("INTERRUPTED: stopped by the user", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
