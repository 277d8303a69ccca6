"""End to end under the real systemd: an unprivileged client's sockets carry frames, and
status, journal, idle exit and restarts behave as the operations docs promise.

One boot for the module. Inside it, a veth pair with QUEUES queues (IPv6 off, so the only
frames on it are the ones a test sends); the probe under test runs as CLIENT_USER through
systemd-run, the far end is tests/container_traffic.py running as root.
"""

from __future__ import annotations

import json
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from container import CLIENT_USER, EXEC_PATH, SOURCE_MOUNT, BootedContainer

from lab.brokerproc import wait_until
from lab.traffic import RunningProbe

pytestmark = pytest.mark.kernel

QUEUES = 3
IFNAME, PEER = "xskt-e2e", "xskt-e2p"
MODE = "native"
OTHER_USER = "xskt-other"
DROP_IN = "/run/systemd/system/xsk-broker.service.d/idle-exit.conf"
IDLE_EXIT = 1.0
# UMEM frames per queue of each probe: half of them (32) wait in the fill ring, so no
# exchange below sends more to a queue at once. Small, because locked memory is charged per
# uid and every container's test users share the host's uids (no user namespace).
FRAMES = 64
# A UMEM the default 8 MiB RLIMIT_MEMLOCK covers (the host's hard limit caps LimitMEMLOCK=).
SMALL_UMEM = ("--umem-bytes", str(1 << 20))
TRAFFIC = [
    "/opt/xsk-broker/bin/python3",
    f"{SOURCE_MOUNT}/tests/container_traffic.py",
    "xskt-ctr",
    PEER,
    IFNAME,
    MODE,
    str(QUEUES),
]


@pytest.fixture(scope="module")
def box() -> Iterator[BootedContainer]:
    with BootedContainer() as booted:
        # With exec(), not path(): /proc/sys/net follows the opener's network namespace.
        for scope in ("all", "default"):
            knob = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
            booted.exec(["sh", "-c", f"echo 1 > {knob}"], check=True)
        booted.add_veth(IFNAME, PEER, QUEUES)
        booted.add_user()
        booted.add_user(OTHER_USER)
        print(f"\ncontainer booted and units installed in {booted.boot_seconds:.2f} s")
        yield booted


class FarEnd:
    """container_traffic.py as root in the container, one command and one reply a line."""

    def __init__(self, box: BootedContainer) -> None:
        self.proc = box.popen(TRAFFIC)
        self.sent = [0] * QUEUES

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"traffic helper died: {self.proc.communicate()[1]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def exchange(self, count: int, label: str) -> list[int]:
        """Send count frames to each rx queue, then wait for the consumer's replies to
        everything sent so far: flow control, so that a consumer slowed down by a busy
        machine never finds its rx ring overrun. Returns the replies seen, per queue, which
        equal self.sent unless frames were lost."""
        for queue, done in enumerate(self._ask(f"send {count} {label}")["sent"]):
            self.sent[queue] += done
        replies: list[int] = self._ask(f"replies {max(self.sent)} 30")["replies"]
        return replies

    def close(self) -> None:
        self.proc.communicate(timeout=10)


@pytest.fixture
def far_end(box: BootedContainer) -> Iterator[FarEnd]:
    peer = FarEnd(box)
    try:
        yield peer
    finally:
        peer.close()


@contextmanager
def probe_running(box: BootedContainer, unit: str, *args: str) -> Iterator[RunningProbe]:
    """`xsk-broker probe --reply` on every queue as CLIENT_USER (no capabilities), once
    bound."""
    argv = [EXEC_PATH, "probe", "--ifname", IFNAME, "--queues", str(QUEUES), "--mode", MODE]
    argv += ["--frames", str(FRAMES), "--send", "0", "--reply", "--duration", "120", "--events"]
    proc = box.start([*argv, *args], CLIENT_USER, unit=unit)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline() if select.select([proc.stdout], [], [], 60)[0] else ""
        if not line:
            box.exec(["systemctl", "stop", unit])
            raise AssertionError(f"probe did not bind: {proc.communicate(timeout=10)[1]}")
        bound = json.loads(line)
        yield RunningProbe(proc, bound["queues"], bound["mode"])
    finally:
        if proc.returncode is None:
            box.exec(["systemctl", "stop", unit])
            proc.communicate(timeout=10)


def leases(box: BootedContainer) -> list[dict[str, Any]]:
    """The broker's lease table as a client sees it (this connection may activate it)."""
    done = box.run([EXEC_PATH, "status", "--json"], user=CLIENT_USER)
    assert done.returncode == 0, done.stderr
    table: list[dict[str, Any]] = json.loads(done.stdout)["leases"]
    return table


def uid_of(box: BootedContainer, user: str) -> str:
    return box.exec(["id", "-u", user], check=True).stdout.strip()


def broker_pid(box: BootedContainer) -> str:
    return box.show("xsk-broker.service", "MainPID")["MainPID"]


def test_an_unprivileged_client_gets_sockets_that_carry_frames_both_ways(
    box: BootedContainer, far_end: FarEnd
) -> None:
    """The whole product under the shipped units: a uid with no capabilities binds every
    queue, receives exactly what was steered to each, and its replies reach the peer."""
    per_queue = 24
    unit = "xskt-probe-frames"
    started = time.monotonic()
    with probe_running(box, unit, "--expect", str(per_queue)) as probe:
        bound_s = time.monotonic() - started
        assert (probe.queues, probe.mode) == (list(range(QUEUES)), MODE)
        pid = box.show(unit, "MainPID")["MainPID"]
        status = box.exec(["cat", f"/proc/{pid}/status"], check=True).stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines())
        assert fields["Uid"].split() == [uid_of(box, CLIENT_USER)] * 4
        assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 0
        assert far_end.exchange(per_queue, "e2e") == [per_queue] * QUEUES
        report = probe.result()
    print(f"\nprobe bound {QUEUES} queues {bound_s * 1000:.0f} ms after systemd-run")
    assert [q.received for q in report.queues] == [per_queue] * QUEUES
    for queue in report.queues:
        assert queue.payloads, queue
        assert all(f" q={queue.queue} " in p for p in queue.payloads), queue


def test_status_text_and_journal_fields_describe_the_lease(box: BootedContainer) -> None:
    """What an operator looks at: `systemctl status` carries the broker's STATUS= line,
    and `journalctl -u xsk-broker EVENT=granted` finds the decision with its fields."""
    unit = "xskt-probe-status"
    with probe_running(box, unit, "--tag", "e2e-status"):
        (lease,) = leases(box)
        consumer = box.show(unit, "MainPID")["MainPID"]
        shown = box.exec(["systemctl", "status", "--no-pager", "xsk-broker"]).stdout
        assert f'Status: "1 lease(s); attached: {IFNAME}/{MODE}"' in shown, shown
        entries = box.journal("-u", "xsk-broker", "EVENT=granted", f"LEASE={lease['lease_id']}")
        assert len(entries) == 1, entries
        entry = entries[0]
        assert entry["_SYSTEMD_UNIT"] == "xsk-broker.service"
        assert (entry["INTERFACE"], entry["QUEUES"], entry["UID"]) == (
            IFNAME,
            f"0-{QUEUES - 1}",  # a span from three queues on (operations.md)
            uid_of(box, CLIENT_USER),
        )
        assert (entry["CONSUMER_PID"], entry["TAG"]) == (consumer, "e2e-status")
    wait_until(
        lambda: (
            box.show("xsk-broker.service", "StatusText")["StatusText"]
            == f"0 lease(s); attached: {IFNAME}/{MODE}"
        )
    )


@pytest.fixture
def idle_exit(box: BootedContainer) -> Iterator[None]:
    """The service with `serve --idle-exit IDLE_EXIT`, through a runtime drop-in as an
    operator would add it; removed again (and the broker restarted) afterwards."""
    drop_in = box.path(DROP_IN)
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(
        f"[Service]\nExecStart=\nExecStart={EXEC_PATH} serve --idle-exit {IDLE_EXIT}\n"
    )
    try:
        box.exec(["systemctl", "daemon-reload"], check=True)
        box.exec(["systemctl", "restart", "xsk-broker"], check=True)
        yield
    finally:
        drop_in.unlink()
        box.exec(["systemctl", "daemon-reload"], check=True)
        box.exec(["systemctl", "restart", "xsk-broker"], check=True)


def test_idle_exit_keeps_the_socket_and_the_next_connection_finds_the_lease(
    box: BootedContainer, far_end: FarEnd, idle_exit: None
) -> None:
    """Idle exit must lose nothing: the consumer keeps receiving while no broker runs, and
    the reactivated broker still lists its lease and refuses its queues to another uid."""
    with probe_running(box, "xskt-probe-idle", "--expect", "10") as probe:
        (lease,) = leases(box)
        first = broker_pid(box)
        last_contact = time.monotonic()
        wait_until(
            lambda: box.show("xsk-broker.service", "ActiveState")["ActiveState"] == "inactive",
            timeout=IDLE_EXIT + 60,
        )
        print(f"\nbroker exited {time.monotonic() - last_contact:.2f} s after the last client")
        socket_unit = box.show("xsk-broker.socket", "ActiveState", "SubState")
        assert socket_unit == {"ActiveState": "active", "SubState": "listening"}
        assert far_end.exchange(5, "idle") == [5] * QUEUES

        assert leases(box) == [lease]
        assert broker_pid(box) not in ("0", first)
        # systemd 252 empties the fd store at an idle exit; the lease's pidfd found again by
        # pid and start time is parked anew for the next restart.
        assert box.show("xsk-broker.service", "NFileDescriptorStore") == {
            "NFileDescriptorStore": "1"
        }
        other = box.run(
            [EXEC_PATH, "request", "--ifname", IFNAME, "--queues", "1", *SMALL_UMEM, "--", "true"],
            user=OTHER_USER,
        )
        assert other.returncode == 1
        assert other.stderr.startswith("QUEUE_BUSY:"), other.stderr
        assert lease["lease_id"] in other.stderr
        denied = box.journal("-u", "xsk-broker", "EVENT=denied", f"UID={uid_of(box, OTHER_USER)}")
        assert [entry["CODE"] for entry in denied] == ["QUEUE_BUSY"]

        assert far_end.exchange(5, "reactivated") == [10] * QUEUES
        report = probe.result()
    assert [q.received for q in report.queues] == [10] * QUEUES


def test_restart_during_traffic_loses_no_frame_and_keeps_the_lease(
    box: BootedContainer, far_end: FarEnd
) -> None:
    """`systemctl restart` while frames flow: the data path never involves the broker, so
    every frame arrives; the new broker takes the lease over and ends it when the consumer
    exits."""
    total, batch, before = 600, 20, 100
    with probe_running(box, "xskt-probe-restart", "--expect", str(total)) as probe:
        (lease,) = leases(box)
        old = broker_pid(box)
        while far_end.sent[0] < before:
            assert far_end.exchange(batch, "before") == far_end.sent
        restart = box.popen(["systemctl", "restart", "xsk-broker"])
        batches_during = 0
        while restart.poll() is None and far_end.sent[0] + batch <= total - before:
            assert far_end.exchange(batch, "during") == far_end.sent
            batches_during += 1
        restart.communicate(timeout=30)
        assert restart.returncode == 0
        assert batches_during > 0

        assert leases(box) == [lease]
        new = broker_pid(box)
        assert new != old
        assert box.show("xsk-broker.service", "NFileDescriptorStore") == {
            "NFileDescriptorStore": "1"
        }
        while far_end.sent[0] < total:
            assert far_end.exchange(batch, "after") == far_end.sent
        assert far_end.sent == [total] * QUEUES
        report = probe.result()
    print(f"\n{batches_during * batch} frames per queue sent while the broker restarted")
    assert [q.received for q in report.queues] == [total] * QUEUES
    expired = box.journal("-u", "xsk-broker", "EVENT=expired", f"LEASE={lease['lease_id']}")
    assert [entry["_PID"] for entry in expired] == [new]
    assert leases(box) == []
