"""A real `xsk-broker serve` process inside a lab namespace, for the demo, tests and bench.

It enters the namespace with setns() and keeps the host's mount namespace, so the pins it
makes live on a bpffs the test owns and survive the process (restart tests need that).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import prctl

from broker.errors import BrokerError
from client.sync import Client
from lab.netlab import UNPRIVILEGED_GID, enter_netns, in_netns, release_sigint, run, sigint_held

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SO_ACCEPTCON = 0x10000  # a listening socket's flag in /proc/net/unix


def public_tempdir(prefix: str = "xskt-") -> Path:
    """A directory the unprivileged test users can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, fail: bool = True) -> bool:
    """Poll predicate until true; the broker's loop acts asynchronously to its clients. The
    default timeout is generous (a loaded 2-core VM), as it costs only a failing run."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if fail:
                raise AssertionError(f"{describe(predicate)} not true within {timeout} s")
            return False
        time.sleep(0.02)
    return True


def describe(predicate: Callable[[], bool]) -> str:
    """Where a polled condition is written (a lambda's source line), for failure messages."""
    code = getattr(predicate, "__code__", None)
    if code is None or hasattr(predicate, "__self__"):  # a method: what it is bound to says more
        return repr(predicate)
    return f"{predicate.__qualname__} ({Path(code.co_filename).name}:{code.co_firstlineno})"


def unix_connections(path: Path | str, netns: str | None = None) -> tuple[int, int]:
    """(waiting, open): connections to the unix socket listening at path that wait in its
    backlog, and those accepted and not yet closed by the listening side. From sock_diag,
    which sees the sockets of one network namespace (netns, or this thread's): the listener
    in its own, and an accepted socket in its client's (the kernel makes it there)."""
    argv = ["ss", "--unix", "--all", "--numeric", "--no-header", "src", str(path)]
    with in_netns(netns) if netns is not None else contextlib.nullcontext():
        rows = [line.split() for line in run(argv).splitlines() if line.strip()]
    waiting = sum(int(row[2]) for row in rows if row[1] == "LISTEN")
    return waiting, sum(row[1] == "ESTAB" for row in rows)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def still_fd_count(pid: int, still: float = 0.1) -> int:
    """pid's fd count once it has not changed for `still` seconds."""
    count, since = fd_count(pid), time.monotonic()
    while time.monotonic() - since < still:
        time.sleep(0.01)
        if (now := fd_count(pid)) != count:
            count, since = now, time.monotonic()
    return count


def settled_fd_count(pid: int, expected: int, timeout: float = 30.0) -> int:
    """pid's fd count once it reaches expected (closed peers are reaped in their owner's
    loop), or whatever it is after timeout."""
    wait_until(lambda: fd_count(pid) == expected, timeout, fail=False)
    return fd_count(pid)


@dataclass(frozen=True)
class BrokerEnv:
    """What a test needs to reach a running lab broker."""

    socket_path: str
    ifname: str
    netns: str
    log: Path


# The lab's policy: anyone who can reach the socket may ask; only root administers.
LAB_POLICY = """
[[allow]]
name = "lab"
users = ["*"]

[[allow]]
name = "lab-admin"
users = [0]
admin = true
"""


class BrokerProcess:
    """Start, stop, kill and restart one broker; its log is kept for failure messages."""

    def __init__(
        self,
        netns: str,
        pin_root: Path,
        workdir: Path,
        *extra: str,
        group: int = UNPRIVILEGED_GID,
        policy: str = LAB_POLICY,
        env: dict[str, str] | None = None,
    ) -> None:
        self.netns = netns
        self.socket_path = workdir / "broker.sock"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "broker.log"
        self.policy_path = workdir / "policy.toml"
        self.policy_path.write_text(policy)
        self.env = env
        self.argv = [
            sys.executable, "-m", "xsk_broker", "serve",
            "--socket", str(self.socket_path),
            "--pin-dir", str(pin_root),
            "--state-dir", str(self.state_dir),
            "--group", str(group),
            "--allow-root",
            "--policy", str(self.policy_path),
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.broker_uid: int | None = None  # the uid it runs as, when not root

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        try:
            # a ^C held over the fork arrives when sigint_held() ends, inside this try
            with open(self.log_path, "ab") as log, sigint_held():
                self.proc = subprocess.Popen(
                    self.argv,
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=self.env,
                    preexec_fn=self._preexec,
                )
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(BrokerError):
                    Client(self.socket_path, timeout=2, broker_uid=self.broker_uid).ping()
                    return self
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"broker did not come up; log:\n{self.log()}")
                time.sleep(0.02)
        except BaseException:  # also ^C: `with` does not call __exit__ when __enter__ fails
            self.stop()
            raise

    def _preexec(self) -> None:
        """In the child: SIGINT as usual, the lab namespace, and SIGTERM should the parent
        die without stopping it."""
        release_sigint()
        prctl.set_pdeathsig(signal.SIGTERM)
        enter_netns(self.netns)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> Client:
        return Client(self.socket_path, broker_uid=self.broker_uid)

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def connections(self) -> tuple[int, int]:
        """(waiting in the listener's backlog, accepted and open) connections to the broker
        from its namespace (the actors') and from the host's (this process's own)."""
        waiting, actors = unix_connections(self.socket_path, self.netns)
        return waiting, actors + unix_connections(self.socket_path)[1]

    def quiet_fd_count(self) -> int:
        """A baseline: the fd count once no connection is waiting or open (start()'s own ping
        is still being reaped when it returns, for as long as a busy machine keeps the loop
        from running) and the count has held still for 100 ms."""
        wait_until(lambda: self.connections() == (0, 0))
        return still_fd_count(self.pid)

    def settled_fd_count(self, expected: int, timeout: float = 30.0) -> int:
        return settled_fd_count(self.pid, expected, timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the process and return its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def listening(pid: int, path: Path) -> bool:
    """Whether a unix socket bound at path listens, in pid's network namespace. Its file
    appears at bind(), a moment before listen(), and stays behind a killed listener."""
    try:
        with open(f"/proc/{pid}/net/unix") as table:
            rows = [line.split() for line in table]
    except OSError:  # pid has exited: nothing of its listens
        return False
    return any(
        len(row) == 8 and row[7] == str(path) and int(row[3], 16) & SO_ACCEPTCON for row in rows
    )


@contextlib.contextmanager
def activated_broker(
    netns: str, pin_dir: Path, workdir: Path, env: Sequence[str] = ()
) -> Iterator[Path]:
    """One broker life under socket activation, as systemd gives it: systemd-socket-activate
    listens in netns and execs `xsk-broker serve --idle-exit 1` on the first connection;
    yields the socket path once it listens. env: VAR=VALUE for the broker (it gets no other).

    On exit it waits for the broker's idle exit (killing it only if that never comes), so
    the next life is a cold start again. Its stdout and stderr go to workdir/broker.log.
    """
    sock = workdir / "broker.sock"
    policy = workdir / "policy.toml"
    policy.write_text(LAB_POLICY)
    argv = [
        "systemd-socket-activate", "--seqpacket", "-l", str(sock),
        *(f"--setenv={var}" for var in env),
        str(VENV_BIN / "xsk-broker"), "serve", "--socket", str(sock),
        "--pin-dir", str(pin_dir), "--state-dir", str(workdir / "state"),
        "--policy", str(policy), "--allow-root", "--idle-exit", "1",
    ]  # fmt: skip
    with open(workdir / "broker.log", "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: enter_netns(netns),
        )  # fmt: skip
    try:
        wait_until(lambda: proc.poll() is not None or listening(proc.pid, sock))
        if proc.poll() is not None:
            raise RuntimeError(f"systemd-socket-activate exited {proc.returncode}")
        yield sock
        proc.wait(timeout=60)  # the idle exit, however loaded the machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)
