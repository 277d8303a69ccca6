"""The `xsk-broker` command: the client commands (client/cli.py), the daemon (`serve`), and
the operator commands that need both sides: doctor, policy check, install-units, demo.

Only this package imports client/, broker/ and lab/ together; each command's module is
imported when that command runs, so `xsk-broker request` loads no daemon code.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from broker import config
from broker.errors import BrokerError, UsageError
from broker.protocol import MODES

EXIT_FAILURE = 1
EXIT_USAGE = 2


def help_width() -> int:
    """The columns argparse sizes help to: shutil.get_terminal_size()'s, less 2."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, sized without importing shutil: it loads zlib, bz2 and lzma (1.5-5 ms
    here), and argparse makes a formatter for every flag it adds, so every socket-activated
    start paid for it before its first reply."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=help_width())


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line with a code like every other error, and help
    is sized by HelpFormatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"USAGE: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def cmd_serve(opts: argparse.Namespace) -> int:
    # The daemon's modules are classes and functions that live as long as the process:
    # collecting while importing them freed nothing and cost ~2 ms of every socket-activated
    # cold start; frozen, later collections do not scan them again.
    gc.disable()
    from broker import daemon

    gc.freeze()
    gc.enable()
    return daemon.main(config.from_flags(opts))


def cmd_policy_check(opts: argparse.Namespace) -> int:
    from xsk_broker import policycheck

    return policycheck.main(opts.file, opts.as_user, as_json=opts.json)


def cmd_doctor(opts: argparse.Namespace) -> int:
    from xsk_broker.doctor import doctor_main

    return doctor_main(opts)


def cmd_install_units(opts: argparse.Namespace) -> int:
    """Put units, polkit actions and examples in place; print what makes them live."""
    from broker import units

    exec_path = opts.exec_path or os.path.abspath(sys.argv[0])
    try:
        written = units.install_units(Path(opts.prefix), exec_path)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot install units under {opts.prefix}: {exc}") from None
    then = [" ".join(c) for c in units.POST_INSTALL]
    if opts.json:
        print(json.dumps({"installed": [str(p) for p in written], "then": then}))
    else:
        print("\n".join(str(p) for p in written))
        print("then run:\n  " + "\n  ".join(then))
    return 0


def cmd_libvirt_watch(opts: argparse.Namespace) -> int:
    from xsk_broker import libvirtwatch

    return libvirtwatch.main(opts.connect, opts.socket, opts.once)


def cmd_demo(opts: argparse.Namespace) -> int:
    from lab import demo

    return demo.main(opts.queues, opts.mode, opts.json)


class _Version(argparse.Action):
    """--version, read from the package metadata only when asked (importlib.metadata is
    ~10 ms that socket activation's first reply should not wait for)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from broker.version import broker_version

        print(f"{parser.prog} {broker_version()}")
        parser.exit()


def build_parser(*, serve_only: bool = False) -> argparse.ArgumentParser:
    """Every command; only `serve` when that is what runs, so a socket-activated start
    builds one subparser and imports no client module."""
    parser = Parser(prog="xsk-broker", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    serve = sub.add_parser("serve", help="run the privileged broker daemon")
    config.add_flags(serve)
    serve.set_defaults(func=cmd_serve)
    if serve_only:
        return parser

    from client import cli as client_cli

    client_cli.add_commands(sub)

    pol = sub.add_parser("policy", help="policy file tools")
    pol_sub = pol.add_subparsers(dest="policy_cmd", required=True, parser_class=Parser)
    chk = pol_sub.add_parser("check", help="validate a policy file and explain it for a user")
    chk.add_argument("file", nargs="?", help=f"policy file (default {config.DEFAULT_POLICY_PATH})")
    chk.add_argument("--as", dest="as_user", metavar="USER", help="explain what USER may have")
    chk.add_argument("--json", action="store_true", help="print JSON instead of text")
    chk.set_defaults(func=cmd_policy_check)

    doc = sub.add_parser("doctor", help="check kernel, bpffs, broker, socket, policy, memlock")
    client_cli.add_socket(doc)
    client_cli.add_json(doc)
    doc.add_argument("--policy", help="policy file to check (default the broker's)")
    doc.add_argument("--pid", type=int, help="consumer pid whose memlock limit to check")
    doc.add_argument("--queues", type=int, default=1, help="queues that consumer would take")
    doc.set_defaults(func=cmd_doctor)

    ins = sub.add_parser(
        "install-units", help="install the systemd units, polkit actions, examples"
    )
    client_cli.add_json(ins)
    ins.add_argument("--prefix", default="/", help="root to install under (default /)")
    ins.add_argument("--exec-path", help="ExecStart= path (default: this xsk-broker)")
    ins.set_defaults(func=cmd_install_units)

    lvw = sub.add_parser(
        "libvirt-watch",
        help="hot-plug the AF_XDP NICs libvirt domains declare in their <metadata>, "
        "whenever they start",
    )
    client_cli.add_socket(lvw)
    lvw.add_argument("--connect", metavar="URI", help="libvirt URI (default: libvirt's own)")
    lvw.add_argument("--once", action="store_true", help="reconcile running domains and exit")
    lvw.set_defaults(func=cmd_libvirt_watch)

    dmo = sub.add_parser(
        "demo", help="the whole product on a private veth pair (root; cleans up after itself)"
    )
    client_cli.add_json(dmo)
    dmo.add_argument("--queues", type=int, default=4, help="veth queues (default 4)")
    dmo.add_argument("--mode", choices=MODES, default="auto", help="XDP mode wish")
    dmo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    opts = build_parser(serve_only=args[:1] == ["serve"]).parse_args(args)
    if getattr(opts, "command", None) and opts.command[0] == "--":
        opts.command = opts.command[1:]
    return run(opts.func, opts)


def run(func: Any, opts: argparse.Namespace) -> int:
    """Run one command: 0 on success; an error is one stderr line starting with its code."""
    try:
        return int(func(opts))
    except BrokerError as error:
        print(f"{error.code}: {error.message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print("INTERRUPTED: stopped by the user", file=sys.stderr)
        return 130
