"""Socket activation, sd_notify and logging, against real sockets and systemd-socket-activate."""

from __future__ import annotations

import array
import grp
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, actor, piped, wait_until

from broker import activation, audit
from client.sync import Client
from lab.brokerproc import activated_broker
from lab.netlab import VethLab

# Imported only when needed, never by a socket-activated start whose first reply hands out
# sockets: every import is time that reply waits for (bench.cold_start, goal p50 <= 60 ms).
OFF_THE_COLD_PATH = (
    "shutil",  # argparse's help width: xsk_broker.cli.HelpFormatter does without
    "broker.dpfront",  # map leases
    "broker.metrics",  # --metrics-file
    "broker.polkit", "jeepney", "concurrent.futures",  # the first check parked for polkit
    "systemd.journal",  # under journald only
    "importlib.metadata",  # --version
    "secrets", "hmac",  # lease ids are os.urandom
    "client", "lab", "xsk_broker.doctor", "asyncio",
)  # fmt: skip


def off_the_cold_path(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in OFF_THE_COLD_PATH)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket playing systemd's NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(60)
        yield sock


def received(sock: socket.socket, count: int) -> list[str]:
    return [sock.recv(4096).decode() for _ in range(count)]


def connect(path: Path, timeout: float = 60) -> socket.socket:
    """Connect once systemd-socket-activate has bound path."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def socket_activate(
    tmp_path: Path, notify: socket.socket, *flags: str
) -> tuple[subprocess.Popen[str], Path]:
    path = tmp_path / "broker.sock"
    argv = ["systemd-socket-activate", *flags, "-l", str(path)]
    argv += ["-E", f"PYTHONPATH={REPO}", "-E", f"NOTIFY_SOCKET={notify.getsockname()}"]
    argv += actor("activated_broker", str(tmp_path / "not-used.sock"))
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return child, path


def test_socket_activated_broker_takes_the_inherited_seqpacket_socket_and_notifies(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    child, path = socket_activate(tmp_path, notify_socket, "--seqpacket")
    try:
        with connect(path) as conn:
            assert received(notify_socket, 2) == ["READY=1\nSTATUS=serving", "STATUS=0 leases"]
            seen = json.loads(conn.recv(4096))
        assert received(notify_socket, 1) == ["STOPPING=1"]
        assert child.wait(60) == 0, piped(child.stderr).read()
    finally:
        child.kill()
        child.wait()
    assert seen == {
        "sockname": str(path),
        "fd": 3,
        "inheritable": False,
        "listen_env": [],
    }
    assert not (tmp_path / "not-used.sock").exists()


@pytest.mark.kernel
def test_an_adopting_cold_start_imports_nothing_its_first_reply_does_not_need(
    pin_root: Path, workdir: Path
) -> None:
    """`python -X importtime` (PYTHONPROFILEIMPORTTIME) of the broker lives bench.cold_start
    times: the first attaches and pins, the second adopts; each serves one request."""
    with VethLab() as lab:
        for _ in range(2):
            with activated_broker(
                lab.ns_a, pin_root, workdir, env=["PYTHONPROFILEIMPORTTIME=1"]
            ) as sock:
                client = Client(sock)
                lease = client.request(lab.ifname_a, 1, umem_bytes=1 << 20)
                lease.close()
                client.release(lease.lease_id)
    log = (workdir / "broker.log").read_text()
    imported = set(re.findall(r"^import time: .*\| +([\w.]+)$", log, re.MULTILINE))
    assert {"broker.daemon", "broker.loader"} <= imported and "adopted" in log, log
    assert sorted(filter(off_the_cold_path, imported)) == []


def test_inherited_stream_socket_is_refused_with_the_fix(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    child, path = socket_activate(tmp_path, notify_socket)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            wait_until(path.exists)
            conn.connect(str(path))
            assert child.wait(60) == 1
    finally:
        child.kill()
        child.wait()
    error = piped(child.stderr).read().strip().splitlines()[-1]
    assert "AF_UNIX SOCK_STREAM, listening" in error
    assert "ListenSequentialPacket=" in error
    assert error.startswith("broker.activation.ActivationError: ACTIVATION: ")


def test_bound_by_hand_with_mode_and_group(tmp_path: Path) -> None:
    path = tmp_path / "run" / "xsk-broker" / "broker.sock"
    # Root may hand the socket to any group (and should: the default gid proves nothing).
    group = grp.getgrall()[-1] if os.geteuid() == 0 else grp.getgrgid(os.getgid())
    with activation.listening_socket(path, 0o660, group.gr_name, inherited=[]) as sock:
        info = path.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == group.gr_gid
        assert sock.type == socket.SOCK_SEQPACKET
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_stale_socket_file_is_replaced_but_a_live_one_or_a_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as dead:
        dead.bind(str(path))
    with activation.listening_socket(path, inherited=[]) as live:
        with pytest.raises(activation.ActivationError, match="another process is listening"):
            activation.listening_socket(path, inherited=[])
        with connect(path):
            assert live.accept()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(activation.ActivationError, match="is not a socket"):
        activation.listening_socket(path, inherited=[])


def test_non_listening_inherited_fds_are_left_for_the_caller(tmp_path: Path) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        inherited = [("lease-1", left.fileno())]
        with activation.listening_socket(tmp_path / "b.sock", inherited=inherited) as sock:
            assert sock.getsockname() == str(tmp_path / "b.sock")
        left.send(b"still open")
        assert right.recv(64) == b"still open"


def test_notifier_is_silent_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = activation.Notifier()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.watchdog()


def test_watchdog_at_half_the_timeout_and_not_more_often(
    monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket
) -> None:
    # An interval of 1 s, so that a test process descheduled between the two kicks (for
    # 100 ms, the interval this used) does not see the second one sent as well.
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = activation.Notifier()
    assert notifier.watchdog_interval == pytest.approx(1.0)
    notifier.watchdog()
    notifier.watchdog()
    assert received(notify_socket, 1) == ["WATCHDOG=1"]
    notify_socket.settimeout(0.05)
    with pytest.raises(TimeoutError):
        notify_socket.recv(64)
    time.sleep(1.0)
    notifier.watchdog()
    assert received(notify_socket, 1) == ["WATCHDOG=1"]


def test_watchdog_meant_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent")
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert activation.Notifier().watchdog_interval is None


def test_store_fds_sends_them_with_their_name(
    monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    read, write = os.pipe()
    try:
        activation.Notifier().store_fds("lease-7", [read])
        message, ancillary, _, _ = notify_socket.recvmsg(4096, socket.CMSG_SPACE(4))
        assert message == b"FDSTORE=1\nFDNAME=lease-7"
        fds = array.array("i", ancillary[0][2])
        os.write(write, b"x")
        assert os.read(fds[0], 1) == b"x"
        os.close(fds[0])
    finally:
        os.close(read)
        os.close(write)


def test_log_event_fields_go_to_stderr_as_key_value(capfd: pytest.CaptureFixture[str]) -> None:
    handler = audit.setup_logging(verbose=False)
    try:
        assert isinstance(handler, logging.StreamHandler)
        audit.log_event(
            logging.getLogger("xsk-broker"), "granted", interface="eth0", queues=[0, 1], uid=1000
        )
        assert (
            capfd.readouterr()
            .err.rstrip()
            .endswith("INFO xsk-broker: granted interface=eth0 queues=0,1 uid=1000")
        )
    finally:
        logging.getLogger().removeHandler(handler)


def test_journal_is_chosen_when_stderr_is_the_journal_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    info = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    assert audit.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
    assert not audit.stderr_is_journal()
