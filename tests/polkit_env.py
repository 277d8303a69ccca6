"""A real system bus and a real polkitd for tests, leaving nothing behind on the host.

polkitd reads its rules and actions only from fixed directories (/etc/polkit-1/rules.d,
/usr/share/polkit-1/rules.d, /usr/share/polkit-1/actions) and resolves subject groups
through the user database. Rather than install files there and hope teardown runs,
polkitd runs in a private mount namespace where those directories, /etc/passwd and
/etc/group are bind mounts of test-owned copies. The namespace dies with polkitd, so even
a killed test run leaves no trace in /etc or /usr/share. The bus is a dbus-daemon of type
"system" with a test-owned config and socket that includes polkit's own bus policy; it sees
the test users too, since it refuses connections from uids it cannot look up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
from support import REPO, piped

POLKITD = "/usr/lib/polkit-1/polkitd"
ACTIONS = REPO / "polkit" / "org.xsk-broker.policy"
EXAMPLE_RULES = REPO / "polkit" / "50-xsk-broker.rules.example"

# name -> (uid, primary group name, supplementary group names); groups get the ids below.
GROUPS = {
    "xsk-users": 61001,
    "xsktest-other": 61002,
    "xsk-admins": 61003,
    "xsk-quarantine": 61004,
    "xsk-broker": 61005,
}
USERS = {
    "xsktest-user": (61001, "xsk-users", ()),
    "xsktest-other": (61002, "xsktest-other", ()),
    "xsktest-admin": (61003, "xsk-admins", ()),
    "xsktest-quarantined": (61004, "xsk-users", ("xsk-quarantine",)),
    "xsk-broker": (61005, "xsk-broker", ()),  # the broker's own user, an action owner
}

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  <include>/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf</include>
</busconfig>
"""


def missing_prerequisites() -> str | None:
    """Why this machine cannot run the harness, or None."""
    if os.geteuid() != 0:
        return "polkitd and the mount namespace need root"
    for tool in ("dbus-daemon", "unshare", POLKITD):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def gid_of(user: str) -> int:
    return GROUPS[USERS[user][1]]


@dataclass
class Identities:
    """Copies of /etc/passwd and /etc/group with the test users and groups appended."""

    passwd: Path
    group: Path

    @classmethod
    def write(cls, directory: Path) -> Identities:
        members: dict[str, list[str]] = {name: [] for name in GROUPS}
        for user, (_, _, extra) in USERS.items():
            for name in extra:
                members[name].append(user)
        passwd, group = directory / "passwd", directory / "group"
        passwd.write_text(
            Path("/etc/passwd").read_text()
            + "".join(
                f"{user}:x:{uid}:{GROUPS[primary]}::/nonexistent:/usr/sbin/nologin\n"
                for user, (uid, primary, _) in USERS.items()
            )
        )
        group.write_text(
            Path("/etc/group").read_text()
            + "".join(f"{name}:x:{gid}:{','.join(members[name])}\n" for name, gid in GROUPS.items())
        )
        for path in (passwd, group):
            path.chmod(0o644)
        return cls(passwd, group)

    def namespaced(self, argv: Sequence[str], mounts: Sequence[tuple[Path, str]] = ()) -> list[str]:
        """argv run in a private mount namespace that sees the test users (and mounts)."""
        binds = [(self.passwd, "/etc/passwd"), (self.group, "/etc/group"), *mounts]
        script = " && ".join(f"mount --bind '{src}' '{dst}'" for src, dst in binds)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'{script} && exec "$@"', "sh", *argv]  # fmt: skip


@dataclass
class PolkitEnv:
    """A running test bus and (while started) polkitd; see polkit_env()."""

    directory: Path
    identities: Identities
    bus_address: str
    dbus: subprocess.Popen[str]
    polkitd: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / "polkitd.log"

    def start_polkitd(self, timeout: float = 60.0) -> None:
        """Start polkitd and wait until it owns org.freedesktop.PolicyKit1 on the bus."""
        mounts = [
            (self.directory / "rules", "/etc/polkit-1/rules.d"),
            (self.directory / "empty", "/usr/share/polkit-1/rules.d"),
            (self.directory / "actions", "/usr/share/polkit-1/actions"),
        ]
        with open(self.log, "ab") as log:
            self.polkitd = subprocess.Popen(
                self.identities.namespaced([POLKITD, "--no-debug"], mounts),
                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self._polkit_on_bus():
            if self.polkitd.poll() is not None or time.monotonic() > deadline:
                self.stop_polkitd()
                raise RuntimeError(f"polkitd did not come up:\n{self.log.read_text()}")
            time.sleep(0.02)

    def stop_polkitd(self) -> None:
        if self.polkitd is not None:
            _stop(self.polkitd)
            self.polkitd = None

    def _polkit_on_bus(self) -> bool:
        bus = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
        with open_dbus_connection(self.bus_address) as conn:
            call = new_method_call(bus, "NameHasOwner", "s", ("org.freedesktop.PolicyKit1",))
            return bool(conn.send_and_get_reply(call, timeout=5).body[0])


def _stop(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def polkit_env(rules: Path = EXAMPLE_RULES, actions: Path = ACTIONS) -> Iterator[PolkitEnv]:
    """A bus, polkitd with exactly these rules and actions, and the test users; torn down
    on every exit path."""
    directory = Path(tempfile.mkdtemp(prefix="xsk-polkit-"))
    dbus = None
    env = None
    try:
        directory.chmod(0o755)  # polkitd runs as user polkitd and must reach the bus socket
        for sub in ("rules", "empty", "actions"):
            (directory / sub).mkdir(mode=0o755)
        shutil.copy(rules, directory / "rules" / "50-xsk-broker-test.rules")
        shutil.copy(actions, directory / "actions" / actions.name)
        socket_path = directory / "bus"
        config = directory / "bus.conf"
        config.write_text(_BUS_CONFIG.format(socket=socket_path))
        ids = Identities.write(directory)
        dbus = subprocess.Popen(  # it must know the test users too, or it drops their connections
            ids.namespaced(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        address = piped(dbus.stdout).readline().strip()  # printed once the socket listens
        if not address:
            raise RuntimeError("dbus-daemon exited before listening")
        env = PolkitEnv(directory, ids, f"unix:path={socket_path}", dbus)
        env.start_polkitd()
        yield env
    finally:
        if env is not None:
            env.stop_polkitd()
        if dbus is not None:
            _stop(dbus)
            piped(dbus.stdout).close()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def identities() -> Iterator[Identities]:
    """The test users and groups alone, for commands run through Identities.namespaced()."""
    directory = Path(tempfile.mkdtemp(prefix="xsk-ids-"))
    try:
        yield Identities.write(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
