"""What `xsk-broker serve` can be told: one table that is ServeConfig, the CLI flags and the docs.

Each field's metadata carries its flag and help; `serve`'s argparse flags are made from it,
daemon.py builds the ServeConfig from the parsed flags, and docs/operations.md holds the
table `python -m broker.config` prints (a test keeps the two equal).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from broker.protocol import DEFAULT_SOCKET_PATH, SOCKET_ENV

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/xsk-broker")
DEFAULT_POLICY_PATH = Path("/etc/xsk-broker/policy.toml")
DEFAULT_STATE_DIR = Path("/run/xsk-broker")


def setting(
    default: Any, help: str, *, flag: str | None = None, short: str | None = None, kind: Any = None
) -> Any:
    """A ServeConfig field; flag defaults to --field-name, kind to the default's type."""
    meta = {"help": help, "flag": flag, "short": short, "kind": kind or type(default)}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `serve` is told, parsed once and passed down."""

    socket_path: Path = setting(
        Path(DEFAULT_SOCKET_PATH), f"listening socket when not socket-activated (or ${SOCKET_ENV})",
        flag="--socket",
    )  # fmt: skip
    group: str | None = setting(
        None, "group that may connect to the socket (mode 0660); default root only", kind=str
    )
    policy_path: Path = setting(DEFAULT_POLICY_PATH, "policy file", flag="--policy")
    pin_root: Path = setting(DEFAULT_PIN_ROOT, "bpffs directory for pins", flag="--pin-dir")
    state_dir: Path = setting(DEFAULT_STATE_DIR, "runtime state: the lease journal")
    idle_exit: float | None = setting(
        None, "exit after this many idle seconds (socket activation)", kind=float
    )
    allow_root: bool = setting(False, "run as full root instead of dropping to three caps")
    verbose: bool = setting(False, "log debug messages", short="-v")
    max_connections: int = setting(1024, "connections open at once")
    max_connections_per_uid: int = setting(128, "connections open at once per uid")
    rate_per_uid: float = setting(200.0, "messages a second per uid (sustained)")
    burst_per_uid: float | None = setting(
        None, "messages per uid in a burst (default twice the rate)", kind=float
    )
    connection_deadline: float = setting(10.0, "seconds a connection may stay silent")
    max_polkit_checks: int = setting(32, "polkit checks waiting at once")
    max_polkit_checks_per_uid: int = setting(2, "polkit checks waiting at once per uid")
    polkit_timeout: float = setting(5.0, "seconds to wait for polkit's answer")
    max_status_leases: int = setting(200, "leases listed in one status reply")
    map_pins: bool = setting(
        False, "pin map leases' XSKMAPs for their consumer uid (keeps CAP_CHOWN)"
    )
    metrics_file: Path | None = setting(
        None, "write metrics for node_exporter's textfile collector here (*.prom)", kind=Path
    )
    without_passrights: bool = setting(
        False, "test switch: leave SO_PASSRIGHTS on, as kernels before 6.16 have it "
        "(client fds then reach the broker and are closed off its loop)",
    )  # fmt: skip

    @property
    def burst(self) -> float:
        return self.burst_per_uid if self.burst_per_uid is not None else 2 * self.rate_per_uid


def flag_of(name: str) -> str:
    meta = ServeConfig.__dataclass_fields__[name].metadata
    return str(meta["flag"] or "--" + name.replace("_", "-"))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeConfig field; unset flags stay None so the field's default wins."""
    for f in fields(ServeConfig):
        flags = [f.metadata["short"], flag_of(f.name)] if f.metadata["short"] else [flag_of(f.name)]
        help = f.metadata["help"]
        if f.metadata["kind"] is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", default=None, help=help)
        else:
            kind = f.metadata["kind"]
            metavar = "PATH" if issubclass(kind, Path) else kind.__name__.upper()
            parser.add_argument(*flags, dest=f.name, type=kind, metavar=metavar, help=help)


def from_flags(opts: argparse.Namespace) -> ServeConfig:
    """The ServeConfig for parsed flags; --socket falls back to $XSK_BROKER_SOCKET."""
    given = {f.name: getattr(opts, f.name) for f in fields(ServeConfig)}
    if given["socket_path"] is None and os.environ.get(SOCKET_ENV):
        given["socket_path"] = Path(os.environ[SOCKET_ENV])
    return ServeConfig(**{name: value for name, value in given.items() if value is not None})


def markdown_table() -> str:
    """The table docs/operations.md carries."""
    lines = ["| flag | default | what it sets |", "|---|---|---|"]
    for f in fields(ServeConfig):
        default = "none" if f.default in (None, MISSING) else f"`{f.default}`"
        short = f"`{f.metadata['short']}`, " if f.metadata["short"] else ""
        lines.append(f"| {short}`{flag_of(f.name)}` | {default} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
