"""The core promise: an unprivileged process gets AF_XDP sockets that really move frames."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import actor, xdp_of

from broker.errors import QueueBusy
from broker.protocol import Request, encode_message
from lab.brokerproc import REPO, BrokerProcess, wait_until
from lab.netlab import VethLab, run_unprivileged, steer_queue
from lab.traffic import Capture, client_env, running_probe, send_to_queue

pytestmark = pytest.mark.kernel
FRAMES_PER_QUEUE = 8


def reachable_queues(mode: str, queues: int) -> int:
    """veth in skb mode cannot steer to its last rx queue (see netlab.steer_queue)."""
    return queues if mode == "native" else queues - 1


@pytest.mark.parametrize("mode", ["native", "skb"])
def test_unprivileged_consumer_receives_and_sends_on_every_queue(
    broker4: BrokerProcess, lab4: VethLab, mode: str
) -> None:
    queues = reachable_queues(mode, 4)
    with (
        running_probe(
            broker4, lab4.ifname_a, queues, "--mode", mode, "--reply",
            "--expect", str(FRAMES_PER_QUEUE),
        ) as probe,
        Capture(lab4.b) as capture,
    ):  # fmt: skip
        assert probe.queues == list(range(queues))
        for queue in probe.queues:
            tx = steer_queue(queue, mode, 4)
            sent = send_to_queue(lab4.b, lab4.a, tx, f"to-q={queue}", FRAMES_PER_QUEUE)
            assert sent == FRAMES_PER_QUEUE
        replies = capture.frames(10.0, want=FRAMES_PER_QUEUE * queues)
        result = probe.result()
    assert result.mode == mode
    for got in result.queues:
        assert got.received == FRAMES_PER_QUEUE, result
        assert all(p.startswith(f"to-q={got.queue} ") for p in got.payloads), got
        assert got.sent == FRAMES_PER_QUEUE
    assert len(replies) == FRAMES_PER_QUEUE * queues
    assert all(frame[14:].startswith(b"reply:to-q=") for frame in replies)


def test_request_execs_command_with_fds_above_stdio_in_queue_order(
    broker4: BrokerProcess, lab4: VethLab, workdir: Path
) -> None:
    """stdin and stdout are closed, so fds would land on 0 and 1 unless moved; nothing but
    the lease's sockets (no connection to the broker, no other fd) is inherited."""
    out = workdir / "inspect.json"
    out.touch(mode=0o666)
    out.chmod(0o666)
    argv = [
        sys.executable, "-m", "xsk_broker", "request", "--ifname", lab4.ifname_a,
        "--queues", "3", "--start-queue", "1", "--id", "vnet7", "--umem-bytes", "1048576", "--",
        *actor("report_fds", str(out), "{sock-fds}", "-netdev", "{netdev}"),
    ]  # fmt: skip
    shell = 'exec 0<&- 1>&-; exec "$@"'
    result = run_unprivileged(
        ["sh", "-c", shell, "sh", *argv], netns=lab4.ns_a, env=client_env(broker4), cwd=str(REPO)
    )
    assert result.returncode == 0, result
    seen = json.loads(out.read_text())
    fds = seen["fds"]
    assert len(fds) == 3 and min(fds) > 2, seen
    assert seen["open"] == sorted([2, *fds]), "only stderr and the lease's sockets reach COMMAND"
    assert seen["families"] == [44, 44, 44]
    assert seen["uid"] != 0
    sock_fds = ":".join(str(fd) for fd in fds)
    assert seen["argv"][0] == sock_fds
    assert (
        seen["argv"][2]
        == seen["netdev"]
        == (
            f"af-xdp,id=vnet7,ifname={lab4.ifname_a},mode=native,queues=3,start-queue=1,"
            f"inhibit=on,sock-fds={sock_fds}"
        )
    )


def test_slots_free_and_stack_gets_traffic_after_consumer_exits(
    broker4: BrokerProcess, lab4: VethLab
) -> None:
    client = broker4.client()
    with running_probe(broker4, lab4.ifname_a, 4, "--mode", "native") as probe:
        assert len(client.status().leases) == 1
        with Capture(lab4.a) as stack:
            send_to_queue(lab4.b, lab4.a, 1, "held", 4)
            assert stack.frames(0.5) == [], "frames for a leased queue must not reach the stack"
        probe.proc.kill()
        probe.proc.wait()
    wait_until(lambda: client.status().leases == [])
    with Capture(lab4.a) as stack:
        send_to_queue(lab4.b, lab4.a, 1, "free", 4)
        assert len(stack.frames(10.0, want=4)) == 4
    with client.request(lab4.ifname_a, 4) as lease:
        assert lease.queue_ids == [0, 1, 2, 3]


def test_consumer_cannot_bind_a_socket_to_another_interface(
    broker4: BrokerProcess, lab4: VethLab
) -> None:
    env = {**client_env(broker4), "IFNAME": lab4.ifname_a}
    result = run_unprivileged(actor("bind_elsewhere"), netns=lab4.ns_a, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"loopback": "EINVAL"}


def test_restart_adopts_pinned_attachment_and_traffic_keeps_flowing(
    broker4: BrokerProcess, lab4: VethLab
) -> None:
    with running_probe(
        broker4, lab4.ifname_a, 2, "--mode", "native", "--expect", "30", duration=60
    ) as probe:
        before = broker4.client().status()
        broker4.kill()
        for queue in (0, 1):
            assert send_to_queue(lab4.b, lab4.a, queue, f"to-q={queue} down", 10) == 10
        broker4.start()
        after = broker4.client().status()
        (old,), (new,) = before.attachments, after.attachments
        assert new.adopted and new.link_id == old.link_id
        assert [lease.lease_id for lease in after.leases] == [
            lease.lease_id for lease in before.leases
        ]
        assert xdp_of(lab4)["prog"]["id"] == old.prog_id
        with pytest.raises(QueueBusy, match=r"queue 1 of .* is leased to pid \d+ \(uid 61000"):
            broker4.client().request(lab4.ifname_a, 1, 1)
        for queue in (0, 1):
            assert send_to_queue(lab4.b, lab4.a, queue, f"to-q={queue} up", 20) == 20
        result = probe.result()
    assert [q.received for q in result.queues] == [30, 30]
    wait_until(lambda: broker4.client().status().leases == [])


def test_every_decision_is_audited_once_with_fields(broker4: BrokerProcess, lab4: VethLab) -> None:
    with running_probe(broker4, lab4.ifname_a, 2, "--tag", "vm7") as probe:
        with pytest.raises(QueueBusy):
            broker4.client().request(lab4.ifname_a, 1, 1, tag="intruder")
        probe.proc.kill()
        probe.proc.wait()
    wait_until(lambda: "event=expired" in broker4.log())
    lines = [line for line in broker4.log().splitlines() if " event=" in line]
    events = [line.split(" event=")[1].split()[0] for line in lines]
    assert events == ["granted", "denied", "expired"], lines
    granted, denied, expired = lines
    for field in (f"interface={lab4.ifname_a}", "queues=0,1", "uid=61000", "tag=vm7"):
        assert field in granted and field in expired, field
    assert f"consumer_pid={probe.proc.pid}" in granted
    assert "code=QUEUE_BUSY" in denied and "queues=1" in denied and "tag=intruder" in denied


def test_release_empties_the_slots_so_released_queues_cannot_be_kept(
    broker4: BrokerProcess, lab4: VethLab
) -> None:
    """A released lease's sockets leave the map, even while their holder keeps them open:
    otherwise release-and-ask-again would hold queues beyond any per-uid quota."""
    client = broker4.client()
    kept = client.request(lab4.ifname_a, 2, umem_bytes=1 << 20)
    try:
        client.release(kept.lease_id)
        with client.request(lab4.ifname_a, 2, umem_bytes=1 << 20) as again:
            assert again.queue_ids == [0, 1]
    finally:
        kept.close()


def test_a_grant_whose_reply_cannot_be_delivered_ends_at_once(
    broker4: BrokerProcess, lab4: VethLab
) -> None:
    """The caller is gone before the broker answers (stopped meanwhile, to be sure): the
    lease for the named consumer must not outlive the fds that never arrived."""
    broker = broker4.proc
    assert broker is not None  # the fixture started it
    consumer = subprocess.Popen(["sleep", "600"])
    try:
        broker.send_signal(signal.SIGSTOP)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.connect(str(broker4.socket_path))
                sock.send(encode_message(Request(lab4.ifname_a, 2, 0, "auto", "orphan",
                                                 consumer.pid, 1 << 20)))  # fmt: skip
        finally:
            broker.send_signal(signal.SIGCONT)
        wait_until(lambda: "the reply could not be delivered" in broker4.log())
        assert broker4.client().status().leases == []
        with broker4.client().request(lab4.ifname_a, 2, umem_bytes=1 << 20) as lease:
            assert lease.queue_ids == [0, 1]  # the slots were emptied too
    finally:
        consumer.kill()
        consumer.wait()
