"""The far end of the test veth inside the booted container: steered frames out, replies in.

A consumer holds AF_XDP sockets on the near end's rx queues, and veth delivers a frame to
rx queue q only when it is sent on the peer's tx queue netlab.steer_queue names, so frames
go out through netlab.QueueSender; what comes back to the peer is counted by
labtraffic.Capture. Both enter namespaces by name, so the container's own network namespace
is given one first. Run as root inside the container (tests/test_container_e2e.py does,
through BootedContainer.popen) and driven over stdin, one command and one JSON line each,
so that one process can send batches before, during and after a broker restart:

    send COUNT LABEL      -> {"sent": [per queue]}     payloads "LABEL q=Q n=I"
    replies WANT SECONDS  -> {"replies": [per queue]}  the probe's "reply:" frames so far

usage: container_traffic.py NETNS PEER TARGET MODE QUEUES
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from client.consumer import make_frame
from client.probe import REPLY_PREFIX
from lab.netlab import Endpoint, QueueSender, netns_path, run, steer_queue
from lab.traffic import Capture

QUEUE_LABEL = re.compile(rb" q=(\d+) ")


def endpoint(netns: str, ifname: str) -> Endpoint:
    sysfs = Path("/sys/class/net") / ifname
    index = int((sysfs / "ifindex").read_text())
    return Endpoint(netns, ifname, index, (sysfs / "address").read_text().strip())


def count_replies(capture: Capture, counts: list[int], want: int, seconds: float) -> None:
    """Add the replies that arrive within seconds to counts (by the queue in their payload)."""
    deadline = time.monotonic() + seconds
    while min(counts) < want and time.monotonic() < deadline:
        for frame in capture.frames(0.05):
            found = QUEUE_LABEL.search(frame)
            if frame[14:].startswith(REPLY_PREFIX) and found:
                counts[int(found[1])] += 1


def main(netns: str, peer_name: str, target_name: str, mode: str, queues: str) -> None:
    if not netns_path(netns).exists():
        run(["ip", "netns", "attach", netns, str(os.getpid())])
    peer, target = endpoint(netns, peer_name), endpoint(netns, target_name)
    count = int(queues)
    senders = [QueueSender(peer, steer_queue(q, mode, count)) for q in range(count)]
    replies = [0] * count
    with Capture(peer) as capture:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "send":
                size, label = int(args[0]), args[1]
                sent = [
                    sender.send(
                        [
                            make_frame(target.mac, peer.mac, f"{label} q={q} n={n} ".encode())
                            for n in range(size)
                        ]
                    )
                    for q, sender in enumerate(senders)
                ]
                print(json.dumps({"sent": sent}), flush=True)
            elif command == "replies":
                count_replies(capture, replies, int(args[0]), float(args[1]))
                print(json.dumps({"replies": replies}), flush=True)
            else:
                raise SystemExit(f"unknown command {command!r}")
    for sender in senders:
        sender.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
