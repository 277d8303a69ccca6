"""Real QEMU processes for the tests: unprivileged, in a lab namespace, console captured.

QEMU runs as the lab's unprivileged uid with no capability but CAP_IPC_LOCK (ambient),
because the host's hard RLIMIT_MEMLOCK is 8 MiB and QEMU registers 32 MiB of UMEM per
queue; no_new_privs is set, so nothing it runs can gain more. Its serial console goes to a
file the test polls. The far end of the veth gets an address, full checksums (AF_XDP hands
frames on as the peer's stack made them, and a guest drops partially-checksummed ones) and,
where a test asks, dnsmasq.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import prctl

from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID, enter_netns, run

SUBNET = "10.77.0"
PEER_IP = f"{SUBNET}.1"
GUEST_IP = f"{SUBNET}.2"


def as_qemu_user(argv: Sequence[str]) -> list[str]:
    """argv as the unprivileged lab uid, keeping only CAP_IPC_LOCK (ambient, bounded)."""
    return [
        "setpriv",
        f"--reuid={UNPRIVILEGED_UID}",
        f"--regid={UNPRIVILEGED_GID}",
        "--clear-groups",
        "--inh-caps=-all,+ipc_lock",
        "--ambient-caps=-all,+ipc_lock",
        "--bounding-set=-all,+ipc_lock",
        "--no-new-privs",
        "--pdeathsig=KILL",  # changing uid clears the one the caller set
        "--",
        *argv,
    ]


def user_dir(parent: Path, name: str) -> Path:
    """A directory the QEMU user owns, for its QMP socket."""
    path = parent / name
    path.mkdir(mode=0o700)
    os.chown(path, UNPRIVILEGED_UID, UNPRIVILEGED_GID)
    return path


def prepare_peer(netns: str, ifname: str, address: str = f"{PEER_IP}/24") -> None:
    """Give the peer end an address and make its stack send full checksums."""
    run(["ip", "-n", netns, "addr", "add", address, "dev", ifname])
    run(["ip", "netns", "exec", netns, "ethtool", "-K", ifname, "tx", "off"])


class Vm:
    """One QEMU process: started in netns with argv as given, stopped (SIGKILL if it must)
    on exit, its console and stderr kept in workdir for failure messages."""

    def __init__(
        self, argv: Sequence[str], netns: str, workdir: Path, env: dict[str, str], name: str
    ) -> None:
        self.argv = list(argv)
        self.netns = netns
        self.env = env
        self.console = workdir / f"{name}.console"
        self.stderr = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Vm:
        with open(self.console, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd="/",
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        return self

    def _preexec(self) -> None:
        prctl.set_pdeathsig(signal.SIGKILL)
        enter_netns(self.netns)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    def describe(self) -> str:
        return f"console:\n{self.output()[-3000:]}\nstderr:\n{self.errors()[-3000:]}"

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of pattern on the console; fails early if QEMU exits first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.MULTILINE)
        while True:
            found = regex.search(self.output())
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"QEMU exited ({self.proc.returncode}) before /{pattern}/\n{self.describe()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no /{pattern}/ within {timeout} s\n{self.describe()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"QEMU still running after {timeout} s\n{self.describe()}"
            ) from None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def dnsmasq(netns: str | Path, ifname: str, workdir: Path) -> Iterator[Path]:
    """A DHCP server (no DNS) on the peer end, in a lab namespace by name or in any network
    namespace by path (/proc/PID/ns/net); yields its log, which shows each DHCPACK."""
    log = workdir / "dnsmasq.log"
    argv = [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", f"--interface={ifname}",
        "--bind-interfaces", "--leasefile-ro", "--pid-file=", "--log-dhcp",
        f"--dhcp-range={SUBNET}.50,{SUBNET}.99,255.255.255.0,2m",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: enter_netns(str(netns)),
        )
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_text(path: Path, pattern: str, timeout: float) -> re.Match[str]:
    """The first match of pattern in a log file that another process writes."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        found = regex.search(path.read_text(errors="replace") if path.exists() else "")
        if found:
            return found
        if time.monotonic() > deadline:
            text = path.read_text(errors="replace") if path.exists() else "(no file)"
            raise AssertionError(f"no /{pattern}/ in {path} within {timeout} s:\n{text[-3000:]}")
        time.sleep(0.05)


def xdp_stats(netns: str, ifname: str) -> dict[str, int]:
    """ethtool -S of an interface: on veth, rx_queue_N_xdp_redirect counts frames that the
    XSKMAP slot N redirected into a socket bound to queue N of that interface (an unbound
    socket or one bound elsewhere fails the redirect), so it proves each slot's binding."""
    text = run(["ip", "netns", "exec", netns, "ethtool", "-S", ifname])
    stats = {}
    for line in text.splitlines()[1:]:
        name, _, value = line.strip().partition(":")
        with contextlib.suppress(ValueError):
            stats[name.strip()] = int(value)
    return stats


def pin_peer_tx(netns: str, ifname: str, queue: int, queues: int) -> None:
    """Make the peer's stack send everything on one tx queue (XPS), which veth delivers to
    the same rx queue of the other end: the guest's traffic then rides that queue only."""
    cpus = os.cpu_count() or 1
    masks = [f"{(1 << cpus) - 1 if q == queue else 0:x}" for q in range(queues)]
    script = "; ".join(
        f"echo {mask} > /sys/class/net/{ifname}/queues/tx-{q}/xps_cpus"
        for q, mask in enumerate(masks)
    )
    run(["ip", "netns", "exec", netns, "sh", "-c", script])
