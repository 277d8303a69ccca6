"""Helpers the test modules share: the command line, an interface's XDP state and pins,
a process's fds, and the argv of the actor scripts in tests/actors/.

Each helper exists once, here; lab/ keeps what the demo and the benchmarks use as well
(wait_until, BrokerProcess and its fd counts), and this module re-exports wait_until.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO, Any, AnyStr

from broker import procinfo
from broker.loader import netns_key
from lab.brokerproc import REPO, BrokerProcess, fd_count, settled_fd_count, wait_until
from lab.netlab import VethLab, in_netns, run, spawn_unprivileged
from lab.traffic import client_env

__all__ = [
    "ACTORS",
    "RAISING_POLICY",
    "REPO",
    "BrokerFactory",
    "Spawn",
    "Tenant",
    "actor",
    "capless_consumer",
    "fd_count",
    "memlock_of",
    "open_fds",
    "pidfd_of_dead",
    "pin_dir",
    "pins_of",
    "piped",
    "run_captured",
    "settled_fd_count",
    "tenants",
    "wait_until",
    "xdp_of",
    "xsk_cli",
]

# Small programs the tests run as other processes (often as other uids): real files, so
# ruff reads them, reached by path so any uid that can reach the checkout can run them.
ACTORS = REPO / "tests" / "actors"

# The callables the `spawn` and `broker_factory` fixtures of conftest.py give a test
# (conftest.py spells them out: test_markers.py runs a copy of it without this module).
Spawn = Callable[..., subprocess.Popen[bytes]]
BrokerFactory = Callable[..., tuple[BrokerProcess, VethLab]]


def actor(name: str, *args: str, python: str = sys.executable, checkout: Path = REPO) -> list[str]:
    """The argv that runs tests/actors/<name>.py with this interpreter (the venv's python
    finds the checkout through its .pth, whatever the cwd); `python` and `checkout` name
    them where another view of the checkout runs it (the container's)."""
    path = ACTORS / f"{name}.py"
    assert path.is_file(), f"no actor {path}"
    return [python, str(checkout / path.relative_to(REPO)), *args]


def run_captured(
    argv: Sequence[str | os.PathLike[str]], *, timeout: float = 30, **options: Any
) -> subprocess.CompletedProcess[str]:
    """argv run to its end with stdout and stderr captured as text; from the checkout, and
    not checked, unless `options` say otherwise (any of subprocess.run's)."""
    options.setdefault("cwd", REPO)
    options.setdefault("check", False)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **options)


def xsk_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`xsk-broker ARGS` as root from the checkout, output captured as text."""
    return run_captured([sys.executable, "-m", "xsk_broker", *args], env=env, timeout=timeout)


def piped(stream: IO[AnyStr] | None) -> IO[AnyStr]:
    """A child's stdin, stdout or stderr that was opened with subprocess.PIPE (and so is
    never None, whatever Popen's type says)."""
    assert stream is not None, "the stream was not opened with subprocess.PIPE"
    return stream


@contextmanager
def pidfd_of_dead(child: subprocess.Popen[bytes]) -> Iterator[int]:
    """A pidfd of child opened while it lived, once child has been killed and reaped: what
    a recycled pid looks like to whoever holds the pidfd."""
    pidfd = os.pidfd_open(child.pid)
    try:
        child.kill()
        child.wait()
        yield pidfd
    finally:
        os.close(pidfd)


# Root may ask, and the broker may raise a consumer's memlock limit to 4 MiB per queue.
RAISING_POLICY = """
[[allow]]
name = "raise"
users = [0]
raise_memlock = true
max_umem_bytes_per_queue = 4194304
"""


def capless_consumer(spawn: Spawn, soft: int, hard: int) -> subprocess.Popen[bytes]:
    """A root `sleep` without CAP_IPC_LOCK and with these memlock limits: a consumer whose
    limit the broker (root, no CAP_SYS_RESOURCE) may raise within the hard limit."""
    consumer = spawn(
        ["setpriv", "--bounding-set=-ipc_lock", "sleep", "600"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard)),
    )
    wait_until(lambda: not procinfo.read_status(consumer.pid).has_cap(procinfo.CAP_IPC_LOCK))
    return consumer


def memlock_of(pid: int) -> tuple[int | None, int | None]:
    """pid's memlock (soft, hard) limits; None is unlimited."""
    limit = procinfo.memlock_limit(pid)
    return limit.soft, limit.hard


def xdp_of(lab: VethLab) -> dict[str, Any]:
    """What `ip` says is attached to the lab's `a` end ({} when nothing is)."""
    link: dict[str, Any]
    (link,) = json.loads(run(["ip", "-n", lab.ns_a, "-j", "-d", "link", "show", lab.ifname_a]))
    xdp: dict[str, Any] = link.get("xdp", {})
    return xdp


def pin_dir(lab: VethLab, pin_root: Path) -> Path:
    """Where a broker pins its attachments for the lab's `a` namespace."""
    with in_netns(lab.ns_a):
        return pin_root / netns_key()


def pins_of(lab: VethLab, pin_root: Path) -> list[str]:
    """Every pin (and directory) below pin_dir(), relative to it."""
    ns_dir = pin_dir(lab, pin_root)
    return sorted(str(p.relative_to(ns_dir)) for p in ns_dir.rglob("*")) if ns_dir.exists() else []


def open_fds(pid: int | str = "self") -> set[str]:
    """The fd numbers a process has open."""
    return set(os.listdir(f"/proc/{pid}/fd"))


def socket_links(fd_dir: Path) -> list[str]:
    """The "socket:[inode]" target of each socket fd in a /proc/PID/fd directory. An fd
    closed between listing and readlink (a QMP connection the peer's main loop is still
    reaping) is no longer open, not an error."""
    links = []
    for fd in fd_dir.iterdir():
        with suppress(FileNotFoundError):
            links.append(os.readlink(fd))
    return [link for link in links if link.startswith("socket:")]


class Tenant:
    """One tenant actor: a process of uid that holds its leases until it exits."""

    def __init__(self, broker: BrokerProcess, uid: int) -> None:
        self.uid = uid
        self.proc = spawn_unprivileged(
            actor("tenant"), uid, netns=broker.netns, env=client_env(broker), cwd=str(REPO),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"tenant {self.uid} died: {self.proc.communicate()[1]}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def leases(self, ifname: str, *queues: int, **args: Any) -> list[str]:
        """One lease per queue; the ids, in queue order."""
        one = {"ifname": ifname, "queues": 1, "umem_bytes": 1 << 20} | args
        reply = self.ask(lease=[one | {"start_queue": q} for q in queues])
        assert "leases" in reply, reply
        ids: list[str] = reply["leases"]
        return ids

    def exit(self) -> None:
        """End the tenant (its leases end with it); again is harmless."""
        if self.proc.returncode is None:
            self.proc.communicate(timeout=30)


@contextmanager
def tenants(broker: BrokerProcess, *uids: int) -> Iterator[list[Tenant]]:
    with ExitStack() as stack:
        crowd = []
        for uid in uids:
            tenant = Tenant(broker, uid)
            stack.callback(tenant.exit)
            crowd.append(tenant)
        yield crowd
