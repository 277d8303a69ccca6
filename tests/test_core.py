"""The core promise: an unprivileged process gets AF_XDP sockets that really move frames."""

from __future__ import annotations

import json

import pytest
from brokerproc import BrokerProcess
from traffic import Capture, running_probe, send_to_queue

from broker.netlab import VethLab, run, steer_queue

pytestmark = pytest.mark.kernel
FRAMES_PER_QUEUE = 8


def xdp_attachments(lab: VethLab) -> str:
    """What `ip` says is attached to the broker's end (empty when nothing is)."""
    (link,) = json.loads(run(["ip", "-n", lab.ns_a, "-d", "-j", "link", "show", lab.ifname_a]))
    return json.dumps(link.get("xdp", {}))


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
    assert result["mode"] == mode
    for got in result["queues"]:
        assert got["received"] == FRAMES_PER_QUEUE, result
        assert all(p.startswith(f"to-q={got['queue']} ") for p in got["payloads"]), got
        assert got["sent"] == FRAMES_PER_QUEUE
    assert len(replies) == FRAMES_PER_QUEUE * queues
    assert all(frame[14:].startswith(b"reply:to-q=") for frame in replies)
