"""Boot the shipped units under a real systemd: a cached Debian rootfs in systemd-nspawn.

The test machines do not run systemd, so socket activation, User=, AmbientCapabilities=,
the sandbox and the journal can only be seen for real inside a container whose PID 1 is
systemd. The rootfs is built once by scripts/container-rootfs.sh and cached outside the
repo under a hash of its inputs; each boot uses a throw-away overlay over it, binds this
checkout read-only at /opt/xsk-broker-src (the rootfs venv sees it through a .pth file)
and installs the units with broker.units, as an operator would. Flags and their reasons:
../shared/systemd-in-a-container.md.

    with BootedContainer() as box:
        box.exec(["systemctl", "is-active", "xsk-broker.socket"])   # root, no unit
        box.run(["xsk-broker", "ping"], user="xskt-client")          # transient unit
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker import units
from lab import cache as labcache

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "container-rootfs.sh"
SOURCE_MOUNT = "/opt/xsk-broker-src"
EXEC_PATH = "/opt/xsk-broker/bin/xsk-broker"
INNER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
CLIENT_USER = "xskt-client"
_names = itertools.count()


def runtime_requirements() -> list[str]:
    """What the rootfs venv needs: the project's dependencies plus the polkit extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("polkit", [])]


def ensure_rootfs() -> Path:
    """The cached rootfs for the current inputs (the script, the requirements, the host's
    Python), built first if missing (about a minute)."""
    requirements = runtime_requirements()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = labcache.entry(
        "rootfs", SCRIPT.read_bytes(), "\n".join(requirements).encode(), python.encode()
    )
    return labcache.ensure(
        path, lambda dest: ["sh", str(SCRIPT), str(dest), sys.executable, *requirements], 900
    )


def console_script() -> str:
    """The `xsk-broker` entry point as a script for the rootfs venv (the source is not
    pip-installed there, only visible through the .pth file)."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = target["xsk-broker"].split(":")
    return (
        f"#!/opt/xsk-broker/bin/python3\nimport sys\nfrom {module} import {func}\n"
        f"sys.exit({func}())\n"
    )


# Whoever may open the socket (group xsk-broker) may ask; root administers.
CONTAINER_POLICY = """
[[allow]]
name = "socket-group"
groups = ["xsk-broker"]

[[allow]]
name = "root"
users = [0]
admin = true
"""


class BootedContainer:
    """A booted container with the units installed and the socket listening.

    exec() runs a command as root in the container's namespaces (admin tools); run() runs
    one as a transient service via systemd-run, so User= and other unit properties apply
    as they would to a real client. Leaving the context powers the container off (killing
    it if it hangs) and unmounts its private bpffs, whatever happened inside.
    """

    def __init__(
        self,
        rootfs: Path | None = None,
        boot_timeout: float = 90,
        binds: Sequence[tuple[Path, str]] = (),
    ) -> None:
        self.rootfs = rootfs
        self.binds = binds  # (host path, path inside), bound read-only
        self.boot_timeout = boot_timeout
        self.machine = f"xskt-{os.getpid()}-{next(_names)}"
        self.leader = 0
        self.boot_seconds = 0.0
        self.log = Path()
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._cleanup = contextlib.ExitStack()

    def __enter__(self) -> BootedContainer:
        try:
            self._boot()
            self._install()
        except BaseException:
            self._cleanup.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup.close()

    def _boot(self) -> None:
        rootfs = self.rootfs or ensure_rootfs()
        bpffs = Path(tempfile.mkdtemp(prefix=f"{self.machine}-bpffs-"))
        self._cleanup.callback(bpffs.rmdir)
        subprocess.run(["mount", "-t", "bpf", "xskt-bpffs", str(bpffs)], check=True)
        self._cleanup.callback(self._unmount, bpffs)
        fd, name = tempfile.mkstemp(prefix=f"{self.machine}-", suffix=".log")
        self.log = Path(name)
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--volatile=overlay",
            "--system-call-filter=bpf",
            "--capability=CAP_BPF",
            "--capability=CAP_IPC_LOCK",  # for units that grant it (examples/vm@.service)
            f"--bind={bpffs}:/sys/fs/bpf",
            f"--bind-ro={REPO}:{SOURCE_MOUNT}",
            *(f"--bind-ro={host}:{inner}" for host, inner in self.binds),
            f"--machine={self.machine}",
            f"--directory={rootfs}",
        ]
        started = time.monotonic()
        with os.fdopen(fd, "w") as log:
            self._nspawn = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._cleanup.callback(self._power_off)
        self.leader = self._find_leader(started + self.boot_timeout)
        self._wait_running(started + self.boot_timeout)
        self.boot_seconds = time.monotonic() - started

    def _find_leader(self, deadline: float) -> int:
        """The container's PID 1 (systemd) as a host pid: nspawn's child once it has exec'd."""
        assert self._nspawn is not None
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.005)
        raise TimeoutError(f"no systemd in the container: {self.log.read_text()[-2000:]}")

    def _wait_running(self, deadline: float) -> None:
        """Poll until systemd is up; right after boot its bus may not answer yet."""
        state = ""
        while time.monotonic() < deadline:
            state = self.exec(["systemctl", "is-system-running"], timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.01)
        raise TimeoutError(f"container still {state!r}: {self.log.read_text()[-2000:]}")

    def _install(self) -> None:
        """Install like an operator: the console script, units via broker.units, then
        sysusers/tmpfiles/daemon-reload/enable --now, inside."""
        script = self.path(EXEC_PATH)
        script.write_text(console_script())
        script.chmod(0o755)
        units.install_units(self.path("/"), EXEC_PATH)
        policy = self.path("/etc/xsk-broker/policy.toml")
        policy.parent.mkdir(exist_ok=True)
        policy.write_text(CONTAINER_POLICY)
        for command in units.POST_INSTALL:
            self.exec(list(command), check=True)

    def _power_off(self) -> None:
        assert self._nspawn is not None
        if self._nspawn.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # then killed below
                self.exec(["systemctl", "poweroff"], timeout=10)
            try:
                self._nspawn.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self._nspawn.pid, signal.SIGKILL)
                self._nspawn.wait()
        self.log.unlink(missing_ok=True)

    @staticmethod
    def _unmount(path: Path) -> None:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)

    def path(self, inner: str) -> Path:
        """The host's view of a path inside the (overlay) root; writes land in the overlay.

        Not for /proc/sys/net: those files act on the network namespace of whoever opens
        them, which from here is the host's; write them through exec().
        """
        return Path(f"/proc/{self.leader}/root") / inner.lstrip("/")

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """argv as root in all of the container's namespaces, outside any unit."""
        return subprocess.run(
            self._nsenter(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def run(
        self,
        argv: Sequence[str],
        user: str | None = None,
        *,
        properties: Sequence[str] = (),
        check: bool = False,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """argv as a transient service (systemd-run --wait --pipe), as user if given.

        properties are extra unit settings ("SupplementaryGroups=...", "LimitMEMLOCK=...").
        The exit status is argv's; stdout and stderr are argv's too.
        """
        return self.exec(_systemd_run(argv, user, properties), check=check, timeout=timeout)

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        """Like exec(), but running alongside the caller, with text pipes on stdin, stdout
        and stderr: for helpers a test talks to while other things happen."""
        return subprocess.Popen(
            self._nsenter(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def start(
        self,
        argv: Sequence[str],
        user: str | None = None,
        *,
        unit: str,
        properties: Sequence[str] = (),
    ) -> subprocess.Popen[str]:
        """Like run(), but in the background as the named transient unit: read its stdout
        while it runs, `systemctl stop UNIT` to end it early, wait() for its exit status."""
        return self.popen(_systemd_run(argv, user, properties, unit))

    def _nsenter(self, argv: Sequence[str]) -> list[str]:
        env = [f"{k}={v}" for k, v in INNER_ENV.items()]
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *env, *argv]

    def add_user(self, name: str = CLIENT_USER, groups: Sequence[str] = ("xsk-broker",)) -> str:
        """A system user (via sysusers.d syntax, as docs tell operators) in groups."""
        lines = [f"u {name} - - / /usr/sbin/nologin"] + [f"m {name} {group}" for group in groups]
        self.exec(["systemd-sysusers", "-"], input="\n".join(lines) + "\n", check=True)
        return name

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show` properties of unit."""
        done = self.exec(["systemctl", "show", unit, f"--property={','.join(properties)}"])
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def journal(self, *matches: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Journal entries (journalctl -o json) matching all of matches, e.g. "INTERFACE=x";
        waits up to timeout for at least one, since journald writes asynchronously."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.exec(["journalctl", "--no-pager", "-o", "json", *matches])
            entries: list[dict[str, Any]] = [
                json.loads(line) for line in done.stdout.splitlines() if line
            ]
            if entries or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)

    def add_veth(self, name: str = "xskt-a", peer: str = "xskt-b", queues: int = 1) -> None:
        """A veth pair inside the container's private network namespace (gone with it)."""
        if not (name.startswith("xskt-") and peer.startswith("xskt-")):
            raise ValueError("test interfaces are named xskt-*")
        self.exec(
            [
                "ip",
                "link",
                "add",
                name,
                "numrxqueues",
                str(queues),
                "numtxqueues",
                str(queues),
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "numrxqueues",
                str(queues),
                "numtxqueues",
                str(queues),
            ],
            check=True,
        )
        for ifname in (name, peer):
            self.exec(["ip", "link", "set", ifname, "up"], check=True)


def _systemd_run(
    argv: Sequence[str],
    user: str | None,
    properties: Sequence[str],
    unit: str | None = None,
) -> list[str]:
    """systemd-run waiting for argv's transient service, with argv's stdio and exit status."""
    command = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
    if unit is not None:
        command.append(f"--unit={unit}")
    if user is not None:
        command.append(f"--property=User={user}")
    command += [f"--property={prop}" for prop in properties]
    return [*command, "--", *argv]
