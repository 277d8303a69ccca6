"""`xsk-broker doctor`: everything an operator must get right, one line each with its fix.

Each check says what it saw and, when it fails, the one setting or command that fixes it,
so a failed first start is diagnosed without reading the source. It needs no privilege:
everything it reads (/proc/PID/status and limits, mountinfo, the socket file) is readable by
any user, and an unprivileged AF_XDP socket() failing with EPERM still proves kernel support.
Checks that depend on the broker answering are reported as failed, not skipped, when it
does not, so the exit status is 0 only when the whole setup is known to be good.
"""

from __future__ import annotations

import argparse
import errno
import grp
import importlib.util
import json
import os
import platform
import pwd
import re
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from broker import caps, memlock, procinfo
from broker.errors import BrokerError
from broker.protocol import QEMU_UMEM_BYTES
from client.exchange import socket_path_from
from client.sync import Client

AF_XDP = 44
XDP_LINK_KERNEL = (5, 9)
BPFFS = "/sys/fs/bpf"
SERVICE_CAPS = " ".join(caps.unit_name(name) for name in caps.REQUIRED)


@dataclass(frozen=True)
class Check:
    """One verdict: what was checked, what was seen, and what to do if it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"OK   {self.name}: {self.detail}"
        return f"FAIL {self.name}: {self.detail}; fix: {self.fix}"


def check_af_xdp() -> Check:
    """EPERM means the family exists and only CAP_NET_RAW is missing (the broker has it)."""
    name = "kernel AF_XDP"
    try:
        socket.socket(AF_XDP, socket.SOCK_RAW, 0).close()
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return Check(name, True, "supported (creating sockets needs CAP_NET_RAW)")
        if exc.errno == errno.EAFNOSUPPORT:
            return Check(
                name,
                False,
                f"this kernel ({platform.release()}) has no AF_XDP sockets",
                "boot a kernel built with CONFIG_XDP_SOCKETS=y",
            )
        return Check(name, False, f"socket(AF_XDP) failed: {exc.strerror}", "see dmesg")
    return Check(name, True, "supported")


def check_xdp_links(release: str | None = None) -> Check:
    """The broker pins bpf_links (BPF_LINK_CREATE for XDP), which arrived in Linux 5.9."""
    release = release or platform.release()
    found = re.match(r"(\d+)\.(\d+)", release)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    wanted = ".".join(map(str, XDP_LINK_KERNEL))
    if version >= XDP_LINK_KERNEL:
        return Check("kernel XDP links", True, f"Linux {release} (>= {wanted})")
    return Check(
        "kernel XDP links",
        False,
        f"Linux {release} has no XDP bpf_links (need >= {wanted})",
        f"upgrade to Linux {wanted} or later",
    )


def check_bpffs(mountinfo: str | None = None) -> Check:
    """Read mountinfo rather than statfs so no bpf library is loaded into a client."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    for line in mountinfo.splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1] if "-" in fields else ""
        if fields[4] == BPFFS and fstype == "bpf":
            return Check("bpffs", True, f"mounted at {BPFFS}")
    return Check(
        "bpffs",
        False,
        f"no bpffs mounted at {BPFFS}, so pins (and restart safety) cannot exist",
        f"mount -t bpf bpf {BPFFS} (systemd does it at boot with sys-fs-bpf.mount)",
    )


def check_socket(socket_path: str) -> Check:
    """Mode 0660 and a group: whoever can connect may ask, so the file is the first gate."""
    name = "socket permissions"
    try:
        info = os.stat(socket_path)
    except OSError as exc:
        return Check(
            name,
            False,
            f"{socket_path}: {exc.strerror}",
            "start the broker (systemctl enable --now xsk-broker.socket) or pass --socket",
        )
    if not stat.S_ISSOCK(info.st_mode):
        return Check(name, False, f"{socket_path} is not a socket", "remove it; restart the broker")
    mode = stat.filemode(info.st_mode)
    group = _group_name(info.st_gid)
    seen = f"{socket_path} {mode} {_user_name(info.st_uid)}:{group}"
    if info.st_mode & stat.S_IWOTH:
        return Check(
            name,
            False,
            f"{seen}: every user may connect",
            "SocketMode=0660 and SocketGroup=xsk-broker in xsk-broker.socket",
        )
    if not os.access(socket_path, os.W_OK, effective_ids=True):
        return Check(
            name,
            False,
            f"{seen}: uid {os.geteuid()} may not connect",
            f"add the user to group {group} (usermod -aG {group} USER; log in again)",
        )
    return Check(name, True, f"{seen}; uid {os.geteuid()} may connect")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_broker(socket_path: str) -> tuple[Check, int | None]:
    """Ping it; the reply's pid is where its capabilities are read from."""
    try:
        reply = Client(socket_path, timeout=5).ping()
    except BrokerError as exc:
        return Check(
            "broker reachable",
            False,
            f"{exc.code} at {socket_path} ({os.strerror(exc.errno)})",
            "start it (systemctl start xsk-broker.socket) or pass --socket PATH",
        ), None
    pid = reply.pid
    return Check("broker reachable", True, f"xsk-broker {reply.broker} pid {pid}"), pid


def check_broker_process(pid: int | None) -> list[Check]:
    """Exactly the three capabilities in every set, a bounding set to match, no_new_privs."""
    names = ("broker capabilities", "broker bounding set", "broker no_new_privs")
    if pid is None:
        return [
            Check(name, False, "not checked: the broker did not answer", "see broker reachable")
            for name in names
        ]
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        return [
            Check(name, False, f"/proc/{pid}/status: {exc.strerror}", "run doctor on its host")
            for name in names
        ]
    sets = caps.parse_status(text)
    allowed = set(caps.REQUIRED) | set(caps.OPTIONAL)
    held = sets["CapEff"] | sets["CapPrm"] | sets["CapInh"] | sets["CapAmb"]
    missing = sorted(set(caps.REQUIRED) - sets["CapEff"])
    extra = sorted(held - allowed)
    effective = ",".join(sorted(sets["CapEff"])) or "none"
    if missing or extra:
        wrong = []
        if missing:
            wrong.append(f"missing {','.join(missing)}")
        if extra:
            wrong.append(f"holds {','.join(extra)} too")
        capability = Check(
            names[0],
            False,
            f"pid {pid} effective {effective}: {'; '.join(wrong)}",
            f"AmbientCapabilities={SERVICE_CAPS} and CapabilityBoundingSet={SERVICE_CAPS} "
            "in xsk-broker.service, run as its own user",
        )
    else:
        note = " (sys_resource: the policy may raise memlock)" if held & set(caps.OPTIONAL) else ""
        capability = Check(names[0], True, f"pid {pid} holds exactly {effective}{note}")
    beyond = sorted(sets["CapBnd"] - allowed)
    bounding = (
        Check(
            names[1],
            False,
            f"{len(beyond)} capabilities beyond the needed ones in the bounding set",
            f"CapabilityBoundingSet={SERVICE_CAPS} in xsk-broker.service",
        )
        if beyond
        else Check(names[1], True, ",".join(sorted(sets["CapBnd"])))
    )
    nnp = re.search(r"^NoNewPrivs:\s*(\d)", text, re.M)
    no_new_privs = (
        Check(names[2], True, "NoNewPrivs 1")
        if nnp and nnp.group(1) == "1"
        else Check(
            names[2],
            False,
            "NoNewPrivs 0: an exec could gain privileges",
            "NoNewPrivileges=yes in xsk-broker.service (and update the broker, which sets it)",
        )
    )
    return [capability, bounding, no_new_privs]


def check_policy(policy_path: str | None) -> Check:
    """Load the file exactly as the broker would; nothing is half-used on an error."""
    if importlib.util.find_spec("broker.policy") is None:
        return Check("policy", True, "no policy support in this version: not checked")
    from broker.config import DEFAULT_POLICY_PATH
    from broker.policy import Policy, PolicyError

    path = Path(policy_path) if policy_path else DEFAULT_POLICY_PATH
    if policy_path is None and not path.exists():
        return Check("policy", True, f"no policy file (none given, none at {path})")
    try:
        policy = Policy.load(path)
    except PolicyError as exc:
        return Check(
            "policy", False, exc.message, f"edit it; `xsk-broker policy check {path}` to retry"
        )
    counted = (
        f"{path}: {len(policy.allow)} allow, {len(policy.deny)} deny rule(s) "
        f"in {len(policy.files)} file(s)"
    )
    if not policy.allow:
        return Check(
            "policy",
            False,
            f"{counted}: nothing is allowed, so every request is denied",
            "add an [[allow]] rule for the users or groups that run consumers",
        )
    return Check("policy", True, counted)


def check_memlock(pid: int, queues: int, held_bytes: int = 0) -> Check:
    """Can pid register queues UMEMs of QEMU's size? The broker asks the same at request."""
    name = f"memlock of pid {pid}"
    needed = memlock.needed_bytes(queues, QEMU_UMEM_BYTES)
    try:
        status = procinfo.read_status(pid)
        limit = procinfo.memlock_limit(pid).soft
    except BrokerError as exc:
        return Check(name, False, exc.message, "pass the pid of a running consumer (--pid)")
    if status.has_cap(procinfo.CAP_IPC_LOCK):
        return Check(name, True, "has CAP_IPC_LOCK: no limit applies")
    held = f" + {memlock.mib(held_bytes)} held by uid {status.uid}" if held_bytes else ""
    wanted = f"{queues} queue(s) need {memlock.mib(needed)}{held}"
    if limit is None:
        return Check(name, True, f"unlimited; {wanted}")
    try:
        memlock.check(pid, needed, held_bytes)
    except BrokerError:
        total = needed + held_bytes
        return Check(
            name,
            False,
            f"RLIMIT_MEMLOCK is {memlock.mib(limit)}; {wanted}",
            f"LimitMEMLOCK={total} in the consumer's unit, `ulimit -l {total // 1024}` "
            "before starting it, or CAP_IPC_LOCK",
        )
    return Check(name, True, f"RLIMIT_MEMLOCK {memlock.mib(limit)} >= {wanted}")


def _held_bytes(socket_path: str, pid: int) -> int:
    """UMEM of live leases whose consumers run as pid's real uid (the kernel sums them)."""
    try:
        leases = Client(socket_path, timeout=5).status().leases
        uid = procinfo.read_status(pid).uid
    except BrokerError:
        return 0
    return sum(
        len(lease.queue_ids) * lease.umem_bytes for lease in leases if lease.consumer_uid == uid
    )


def run_checks(
    socket_path: str, policy_path: str | None, pid: int | None, queues: int
) -> list[Check]:
    """Every check, in the order an operator fixes them (kernel first, consumer last)."""
    reachable, broker_pid = check_broker(socket_path)
    consumer = os.getpid() if pid is None else pid
    held = _held_bytes(socket_path, consumer) if reachable.ok else 0
    return [
        check_af_xdp(),
        check_xdp_links(),
        check_bpffs(),
        check_socket(socket_path),
        reachable,
        *check_broker_process(broker_pid),
        check_policy(policy_path),
        check_memlock(consumer, queues, held),
    ]


def doctor_main(opts: argparse.Namespace) -> int:
    """opts: socket, policy, pid, queues, json. Exit status 0 only if every check passed."""
    checks = run_checks(socket_path_from(opts.socket), opts.policy, opts.pid, opts.queues)
    if opts.json:
        print(json.dumps([asdict(check) for check in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
    return 0 if all(check.ok for check in checks) else 1
