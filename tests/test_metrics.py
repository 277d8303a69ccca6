"""Metrics for node_exporter: the text, the atomic file, the start tally, and Debian's real
node_exporter serving what a real broker wrote (the kernel tests)."""

from __future__ import annotations

import os
import resource
import signal
import socket
from pathlib import Path

import pytest
from node_exporter import NodeExporter, key, parse
from support import BrokerFactory, Spawn, xsk_cli

from broker import metrics
from broker.core import NO_OP, NeedsPolkit
from broker.errors import BadQueues, MemlockExceeded, QueueBusy, UsageError
from broker.frontend import Answer, Waiting
from broker.metrics import Metrics, Timed, write_atomically
from broker.policy import Caller
from broker.protocol import AttachmentInfo, Granted, LeaseInfo, Pong
from broker.trust import UntrustedPath
from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID

KIB = 1024


def lease(ifname: str, queues: list[int], consumer_uid: int = 1000) -> LeaseInfo:
    return LeaseInfo(
        "aa", ifname, 3, queues, "native", 1000, 1, 1, None, 4096, 0.0, consumer_uid, "r"
    )


def attachment(ifname: str, mode: str) -> AttachmentInfo:
    return AttachmentInfo(ifname, 3, mode, 4, 1, 1, "/pins", False)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def made(
    tmp_path: Path, live: list[LeaseInfo] | None = None, clock: Clock | None = None
) -> Metrics:
    state = ([attachment("eth0", "native")], live or [])
    path = tmp_path / "xsk-broker.prom"
    return Metrics(path, tmp_path, lambda: state, clock=clock or Clock(), wallclock=lambda: 1.5)


def test_the_text_carries_every_family_once_with_its_figures(tmp_path: Path) -> None:
    m = made(tmp_path, [lease('ve"th\\0', [0, 1]), lease('ve"th\\0', [2])])
    m.decided("request", Granted(lease("eth0", [0])))
    m.decided("request", QueueBusy("queue 0 is leased"))
    m.decided(NO_OP, BadQueues("queues must be 1.."))
    for seconds in (0.0002, 0.003, 7.0):
        m.answered("request", seconds)
    text = m.render()
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families)) == 11
    got = parse(text)
    assert got[key("xsk_broker_leases", interface='ve\\"th\\\\0')] == 2
    assert got[key("xsk_broker_leased_queues", interface='ve\\"th\\\\0')] == 3
    assert got[key("xsk_broker_leases", interface="eth0")] == 0  # attached, no lease
    assert got[key("xsk_broker_attachments", mode="native")] == 1
    assert got[key("xsk_broker_attachments", mode="skb")] == 0
    assert got[key("xsk_broker_grants_total", interface="eth0", mode="native")] == 1
    assert got[key("xsk_broker_refusals_total", op="request", code="QUEUE_BUSY")] == 1
    assert got[key("xsk_broker_refusals_total", op="none", code="BAD_QUEUES")] == 1
    bucket = "xsk_broker_request_duration_seconds_bucket"
    assert got[key(bucket, op="request", le="0.0005")] == 1
    assert got[key(bucket, op="request", le="0.005")] == 2
    assert got[key(bucket, op="request", le="5.0")] == 2
    assert got[key(bucket, op="request", le="+Inf")] == 3
    assert got[key("xsk_broker_request_duration_seconds_count", op="request")] == 3
    assert got[key("xsk_broker_up")] == 1
    assert got[key("xsk_broker_start_time_seconds")] == 1.5


def test_a_memlock_shortfall_is_shown_per_consumer_uid_until_it_is_granted(
    tmp_path: Path,
) -> None:
    m = made(tmp_path)
    details = {"uid": 61000, "limit_bytes": 64 * KIB, "needed_bytes": 96 * KIB, "held_bytes": 0}
    m.decided("request", MemlockExceeded("RLIMIT_MEMLOCK of pid 7 is ...", details=details))
    assert parse(m.render())[key("xsk_broker_memlock_shortfall_bytes", uid="61000")] == 32 * KIB
    m.decided("request", Granted(lease("eth0", [0], consumer_uid=61000)))
    assert not [k for k in parse(m.render()) if k[0] == "xsk_broker_memlock_shortfall_bytes"]


def test_writes_wait_for_a_change_and_at_most_one_a_second(tmp_path: Path) -> None:
    clock = Clock()
    m = made(tmp_path, clock=clock)
    assert m.next_timeout() == 0.0  # nothing written yet
    m.flush()
    assert m.path.exists() and m.next_timeout() is None
    m.decided("ping", Pong("1", 1))
    clock.now += 0.25
    assert m.next_timeout() == pytest.approx(metrics.WRITE_INTERVAL - 0.25)
    m.path.unlink()
    m.flush()
    assert not m.path.exists()
    clock.now += metrics.WRITE_INTERVAL
    m.flush()
    assert m.path.exists()


def test_a_metrics_file_must_be_one_node_exporter_reads(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"does not end in \.prom"):
        Metrics(tmp_path / "xsk-broker.txt", tmp_path, lambda: ([], []))


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775], ids=["world", "sticky", "group"])
def test_a_metrics_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "textfile"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(UntrustedPath, match="metrics directory"):
        Metrics(shared / "xsk-broker.prom", tmp_path, lambda: ([], []))
    assert list(shared.iterdir()) == []


def test_starts_are_counted_across_brokers_with_how_the_last_one_ended(tmp_path: Path) -> None:
    def starts(m: Metrics) -> dict[str, float]:
        got = parse(m.path.read_text())
        return {p: got[key("xsk_broker_starts_total", previous=p)] for p in metrics.PREVIOUS}

    first = made(tmp_path, [lease("eth0", [0])])
    first.start()
    assert starts(first) == {"none": 1, "stopped": 0, "died": 0}
    first.stop()
    assert parse(first.path.read_text())[key("xsk_broker_up")] == 0
    second = made(tmp_path, [lease("eth0", [0])])
    second.start()  # and then dies without stop()
    assert starts(second) == {"none": 1, "stopped": 1, "died": 0}
    third = made(tmp_path)
    third.start()
    assert starts(third) == {"none": 1, "stopped": 1, "died": 1}
    got = parse(third.path.read_text())
    assert got[key("xsk_broker_adopted_total", kind="attachment")] == 3
    assert got[key("xsk_broker_adopted_total", kind="lease")] == 2


def test_an_unreadable_tally_starts_over_and_a_failed_start_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    (tmp_path / metrics.TALLY_NAME).write_text("{not json")
    made(tmp_path).start()
    kept = (tmp_path / metrics.TALLY_NAME).read_bytes()
    made(tmp_path).stop()  # never started: says nothing
    assert (tmp_path / metrics.TALLY_NAME).read_bytes() == kept


def test_the_write_replaces_a_planted_symlink_and_never_follows_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "x.prom"
    target.symlink_to(victim)
    old = os.umask(0o077)
    try:
        write_atomically(target, b"figures\n")
    finally:
        os.umask(old)
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_text() == "figures\n"
    assert target.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim", "x.prom"]


def test_a_failed_write_leaves_no_temp_file_and_is_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = made(tmp_path)
    m.path.mkdir()  # rename() onto a directory fails
    m.write()
    m.write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xsk-broker.prom"]
    assert len([r for r in caplog.records if "cannot write metrics" in r.message]) == 1


class Inner:
    """A front end whose core decides op (through the metrics) or waits for polkit."""

    def __init__(self, m: Metrics, op: str, wait: bool) -> None:
        self.m, self.op, self.wait = m, op, wait

    def refuse(self, error: Exception) -> Answer:
        return Answer(b"no")

    def handle(self, caller: Caller, data: bytes) -> Answer | Waiting:
        if self.wait:
            check = NeedsPolkit("act", {}, lambda _: pytest.fail(), lambda: None)
            return Waiting(check, self._finish)
        return self._finish(None)

    def _finish(self, verdict: BaseException | None) -> Answer:
        self.m.decided(self.op, Pong("1", 1))
        return Answer(b"yes")


@pytest.mark.parametrize("wait", [False, True], ids=["direct", "after-polkit"])
def test_answers_are_timed_under_the_operation_the_core_decided(tmp_path: Path, wait: bool) -> None:
    m = made(tmp_path)
    front = Timed(Inner(m, "status", wait), m)
    answer = front.handle(Caller(0, 0, (), 1), b"{}")
    if isinstance(answer, Waiting):
        assert not m.latency
        answer = answer.finish(None)
    assert answer == Answer(b"yes")
    assert m.latency["status"].count == 1
    front.refuse(QueueBusy("x"))
    assert m.refusals[(NO_OP, "QUEUE_BUSY")] == 1


# --- a real broker, Debian's node_exporter ---

POLICY = """
# Another uid's consumer on the same interface, to show its memlock shortfall.
exclusive_tenancy = false

[[allow]]
name = "lab"
users = ["*"]
other_consumers = true

[[allow]]
name = "lab-admin"
users = [0]
admin = true
"""


def _small_memlock() -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * KIB, 64 * KIB))


@pytest.fixture
def textfile_dir(workdir: Path) -> Path:
    path = workdir / "textfile"
    path.mkdir(mode=0o755)
    return path


@pytest.mark.kernel
def test_serve_refuses_a_metrics_directory_others_can_write_before_making_anything(
    pin_root: Path, workdir: Path
) -> None:
    shared = workdir / "textfile"
    shared.mkdir()
    shared.chmod(0o1777)
    done = xsk_cli(
        "serve", "--allow-root", "--idle-exit", "1", "--socket", str(workdir / "b.sock"),
        "--pin-dir", str(pin_root), "--state-dir", str(workdir / "state"),
        "--policy", str(workdir / "policy.toml"), "--metrics-file", str(shared / "x.prom"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"UNTRUSTED_PATH: metrics directory: {shared}")
    assert sorted(p.name for p in workdir.iterdir()) == ["textfile"]
    assert list(shared.iterdir()) == [] and not pin_root.exists()


@pytest.mark.kernel
def test_node_exporter_serves_what_a_real_broker_counts(
    broker_factory: BrokerFactory, spawn: Spawn, workdir: Path, textfile_dir: Path
) -> None:
    # As docs/operations.md says: in the broker's own state directory (/run/xsk-broker),
    # linked from node_exporter's textfile directory.
    broker, lab = broker_factory("--metrics-file", str(workdir / "state" / "x.prom"), policy=POLICY)
    (textfile_dir / "xsk-broker.prom").symlink_to(broker.state_dir / "x.prom")
    exporter = NodeExporter(spawn, textfile_dir)
    client = broker.client()
    ifname = lab.ifname_a
    granted = client.request(ifname, 2, umem_bytes=64 * KIB)
    granted.close()
    with pytest.raises(QueueBusy):
        client.request(ifname, 1, start_queue=1, umem_bytes=64 * KIB)
    with pytest.raises(BadQueues):
        client.request(ifname, 1, start_queue=9, umem_bytes=64 * KIB)
    child = spawn(
        user=UNPRIVILEGED_UID, group=UNPRIVILEGED_GID, extra_groups=[], preexec_fn=_small_memlock
    )
    with pytest.raises(MemlockExceeded):
        client.request(ifname, 2, start_queue=2, consumer_pid=child.pid, umem_bytes=64 * KIB)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(str(broker.socket_path))
        raw.send(b"not json")
        raw.recv(4096)

    got = exporter.scrape_until(
        lambda got: (
            got.get(key("xsk_broker_leases", interface=ifname)) == 1
            and got.get(key("xsk_broker_refusals_total", op="none", code="BAD_MESSAGE")) == 1
        )
    )
    assert got[key("node_textfile_scrape_error")] == 0
    assert got[key("xsk_broker_up")] == 1
    assert got[key("xsk_broker_leased_queues", interface=ifname)] == 2
    mode = granted.mode
    assert got[key("xsk_broker_attachments", mode=mode)] == 1
    assert got[key("xsk_broker_grants_total", interface=ifname, mode=mode)] == 1
    for code in ("QUEUE_BUSY", "BAD_QUEUES", "MEMLOCK"):
        assert got[key("xsk_broker_refusals_total", op="request", code=code)] == 1
    # 2 UMEMs of 64 KiB against a 64 KiB limit
    assert got[key("xsk_broker_memlock_shortfall_bytes", uid=str(UNPRIVILEGED_UID))] == 64 * KIB
    assert got[key("xsk_broker_request_duration_seconds_count", op="request")] == 4
    assert got[key("xsk_broker_request_duration_seconds_bucket", op="ping", le="+Inf")] >= 1
    assert got[key("xsk_broker_starts_total", previous="none")] == 1

    broker.stop()  # clean: the file stays, saying so
    got = exporter.scrape()
    assert got[key("xsk_broker_up")] == 0
    assert got[key("xsk_broker_leases", interface=ifname)] == 1
    broker.start()  # adopts the attachment and the lease (this test process is its consumer)
    broker.stop(signal.SIGKILL)
    broker.start()
    got = exporter.scrape_until(lambda got: got.get(key("xsk_broker_up")) == 1)
    assert got[key("xsk_broker_starts_total", previous="stopped")] == 1
    assert got[key("xsk_broker_starts_total", previous="died")] == 1
    assert got[key("xsk_broker_adopted_total", kind="attachment")] == 2
    assert got[key("xsk_broker_adopted_total", kind="lease")] == 2
    assert key("xsk_broker_grants_total", interface=ifname, mode=mode) not in got  # per process
    assert got[key("xsk_broker_leases", interface=ifname)] == 1
    client.release(granted.lease_id)
    got = exporter.scrape_until(
        lambda got: got.get(key("xsk_broker_leases", interface=ifname)) == 0
    )
    assert got[key("node_textfile_scrape_error")] == 0
