"""The privileged lab for the demo, the tests and the benchmarks (never used by the daemon).

Everything it creates is named `xskt-...` and lives in network namespaces of its own, so
nothing touches the host's interfaces, and everything is torn down on exit or on error.
Namespaces are entered with setns() on the calling thread rather than with `ip netns exec`,
so the host's mount namespace (and a bpffs the test owns) stays visible.

QueueSender uses client.consumer: the lab drives both sides of a lease, so it may import
client code although the daemon's modules do not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypedDict, overload

import prctl

from client.consumer import AF_XDP, XskSocket

log = logging.getLogger(__name__)

PREFIX = "xskt-"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
# Numeric ids with no passwd entry, so tests never create users.
UNPRIVILEGED_UID = 61000
UNPRIVILEGED_GID = 61000
DEFAULT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def run(argv: Sequence[str]) -> str:
    """Run one command, log it, and return its stdout; a failure raises LabError."""
    log.debug("run: %s", " ".join(argv))
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(
            f"`{' '.join(argv)}` exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def unique_name() -> str:
    """`xskt-` and 6 hex digits: with a one-letter suffix still a valid 15-byte ifname."""
    return PREFIX + secrets.token_hex(3)


def netns_path(name: str) -> Path:
    """/run/netns/NAME, or NAME itself when it is absolute (such as /proc/PID/ns/net)."""
    return NETNS_DIR / name


def enter_netns(name: str) -> None:
    """Move the calling thread into the named network namespace (needs CAP_SYS_ADMIN)."""
    path = netns_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(
            errno.ENOENT, f"network namespace {name!r} does not exist (no {path})"
        ) from None
    try:
        _setns(fd, f"network namespace {name!r}")
    finally:
        os.close(fd)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what} failed: {errno.errorcode.get(err, err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in a network namespace, on this thread only, keeping the mount namespace.

    Sockets created inside stay in that namespace after the block; the thread returns to
    its original namespace even when the block raises.
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter_netns(name)
        try:
            yield
        finally:
            _setns(original, "the original network namespace")
    finally:
        os.close(original)


class _IpLink(TypedDict):
    """The part of an `ip -j link show` entry that the lab reads."""

    ifindex: int
    address: str


@dataclass(frozen=True)
class Endpoint:
    """One end of the veth pair: where it lives and how to address it."""

    netns: str
    ifname: str
    ifindex: int
    mac: str


class VethLab:
    """Two fresh network namespaces joined by a veth pair with `queues` rx/tx queues each.

    `a` is the end a broker serves, `b` its peer. IPv6 is off in both namespaces so that
    the only traffic is what a test sends. Setup failures and exits always delete both
    namespaces, which destroys the veth pair with them.
    """

    def __init__(self, queues: int = 1) -> None:
        if queues < 1:
            raise ValueError(f"queues must be at least 1, got {queues}")
        self.queues = queues
        self.name = unique_name()
        self.ns_a = self.ifname_a = self.name + "a"
        self.ns_b = self.ifname_b = self.name + "b"
        self.a: Endpoint
        self.b: Endpoint

    @property
    def namespaces(self) -> tuple[str, str]:
        return (self.ns_a, self.ns_b)

    def __enter__(self) -> VethLab:
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    def _setup(self) -> None:
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            with in_netns(ns):
                for scope in ("all", "default"):
                    Path(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6").write_text("1")
        queues = ["numtxqueues", str(self.queues), "numrxqueues", str(self.queues)]
        run(
            [
                "ip",
                "-n",
                self.ns_a,
                "link",
                "add",
                self.ifname_a,
                *queues,
                "type",
                "veth",
                "peer",
                "name",
                self.ifname_b,
                "netns",
                self.ns_b,
                *queues,
            ]
        )
        self.a = self._up(self.ns_a, self.ifname_a)
        self.b = self._up(self.ns_b, self.ifname_b)

    @staticmethod
    def _up(ns: str, ifname: str) -> Endpoint:
        run(["ip", "-n", ns, "link", "set", ifname, "up"])
        links: list[_IpLink] = json.loads(
            run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname])
        )
        (link,) = links
        return Endpoint(ns, ifname, link["ifindex"], link["address"])

    def teardown(self) -> None:
        """Delete both namespaces (whichever exist); raise only after trying both."""
        failures = []
        for ns in self.namespaces:
            if netns_path(ns).exists():
                try:
                    run(["ip", "netns", "delete", ns])
                except LabError as exc:
                    failures.append(str(exc))
        if failures:
            raise LabError("; ".join(failures))


def steer_queue(target_rx_queue: int, mode: str, queues: int) -> int:
    """The peer tx queue whose frames veth delivers to target_rx_queue of the other end.

    Native XDP sees rx_queue_index q for frames sent on peer tx queue q. Generic (skb) XDP
    sees q-1, with q=0 and q=1 both giving 0, so there the last rx queue is unreachable.
    """
    if not 0 <= target_rx_queue < queues:
        raise ValueError(f"rx queue {target_rx_queue} does not exist (queues: {queues})")
    if mode == "native":
        return target_rx_queue
    if mode != "skb":
        raise ValueError(f"mode must be 'native' or 'skb', got {mode!r}")
    if target_rx_queue == queues - 1 and queues > 1:
        raise ValueError(
            f"in skb mode veth cannot steer frames to its last rx queue ({target_rx_queue})"
        )
    return target_rx_queue + 1 if queues > 1 else 0


class QueueSender:
    """A root AF_XDP socket on an endpoint's tx queue, for steering frames to a peer rx queue.

    Copy mode and no XDP program are needed on the sending side; see steer_queue() for
    which tx queue reaches which rx queue.
    """

    def __init__(self, endpoint: Endpoint, tx_queue: int, *, frames: int = 64) -> None:
        with in_netns(endpoint.netns), xdp_socket() as sock:
            self.xsk = XskSocket(
                sock.fileno(), endpoint.ifindex, tx_queue, frames=frames, ring_size=32
            )

    def send(self, frames: list[bytes], timeout: float = 1.0) -> int:
        return self.xsk.send(frames, timeout)

    def close(self) -> None:
        self.xsk.close()

    def __enter__(self) -> QueueSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def xdp_socket() -> socket.socket:
    """A fresh, unbound AF_XDP socket in the calling thread's netns (needs CAP_NET_RAW)."""
    return socket.socket(AF_XDP, socket.SOCK_RAW, 0)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold SIGINT while a subprocess with a preexec_fn forks: CPython then runs at-fork
    hooks (logging's) in the parent, and a KeyboardInterrupt raised inside one is printed and
    dropped, so a ^C would be lost. Held, it arrives just after. Children unhold it in their
    preexec_fn (release_sigint)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def release_sigint() -> None:
    """In a child forked under sigint_held(): the signal mask is inherited across exec."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def unprivileged_preexec(
    uid: int, gid: int, *, netns: str | None = None, extra_groups: Sequence[int] = ()
) -> Callable[[], None]:
    """A subprocess preexec_fn: enter netns, then become uid/gid with no way back.

    Clears the inheritable, ambient and bounding capability sets while still privileged,
    then switches ids (which empties the permitted and effective sets) and sets
    PR_SET_NO_NEW_PRIVS so no setuid binary or file capability can give anything back.
    """

    def preexec() -> None:
        release_sigint()
        if netns is not None:
            enter_netns(netns)
        prctl.cap_inheritable.limit()
        prctl.capbset.limit()
        os.setgroups(list(extra_groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        prctl.set_no_new_privs(1)

    return preexec


@overload
def spawn_unprivileged(
    argv: Sequence[str],
    uid: int = ...,
    gid: int = ...,
    *,
    netns: str | None = ...,
    extra_groups: Sequence[int] = ...,
    env: Mapping[str, str] | None = ...,
    pass_fds: Sequence[int] = ...,
    text: Literal[True],
    **popen_kwargs: Any,
) -> subprocess.Popen[str]: ...


@overload
def spawn_unprivileged(
    argv: Sequence[str],
    uid: int = ...,
    gid: int = ...,
    *,
    netns: str | None = ...,
    extra_groups: Sequence[int] = ...,
    env: Mapping[str, str] | None = ...,
    pass_fds: Sequence[int] = ...,
    text: Literal[False] = ...,
    **popen_kwargs: Any,
) -> subprocess.Popen[bytes]: ...


def spawn_unprivileged(
    argv: Sequence[str],
    uid: int = UNPRIVILEGED_UID,
    gid: int = UNPRIVILEGED_GID,
    *,
    netns: str | None = None,
    extra_groups: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    text: bool = False,
    **popen_kwargs: Any,  # the rest of subprocess.Popen's keyword arguments, passed on
) -> subprocess.Popen[str] | subprocess.Popen[bytes]:
    """Start argv as uid/gid with no capabilities, optionally inside a network namespace.

    The namespace is checked here because an error inside preexec_fn loses its message.
    """
    if netns is not None and not netns_path(netns).exists():
        raise OSError(errno.ENOENT, f"network namespace {netns!r} does not exist")
    popen_kwargs.setdefault("cwd", "/")
    with sigint_held():
        return subprocess.Popen(
            argv,
            env=dict(DEFAULT_ENV if env is None else env),
            pass_fds=tuple(pass_fds),
            preexec_fn=unprivileged_preexec(uid, gid, netns=netns, extra_groups=extra_groups),
            text=text,
            **popen_kwargs,
        )


def run_unprivileged(
    argv: Sequence[str],
    uid: int = UNPRIVILEGED_UID,
    gid: int = UNPRIVILEGED_GID,
    *,
    timeout: float = 30.0,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Like spawn_unprivileged, but wait for it and capture its output as text."""
    with spawn_unprivileged(
        argv, uid, gid, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def bpffs() -> Iterator[Path]:
    """A private bpffs mounted on a temporary directory, unmounted and removed on exit."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX + "bpf-"))
    try:
        run(["mount", "-t", "bpf", PREFIX + "bpf", str(path)])
        try:
            yield path
        finally:
            run(["umount", str(path)])
    finally:
        path.rmdir()
