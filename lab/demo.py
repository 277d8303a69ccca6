"""`xsk-broker demo`: the whole product on a private veth pair, start to finish.

Needs root (it makes namespaces, a veth pair and a bpffs of its own); touches nothing else
on the machine and removes everything it made, also when interrupted.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

from client.probe import REPLY_PREFIX
from lab.brokerproc import BrokerProcess, public_tempdir
from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID, VethLab, bpffs, steer_queue
from lab.traffic import Capture, running_probe, send_to_queue


@dataclass
class DemoQueue:
    """A queue of the probe's report, and how many frames the peer sent it."""

    queue: int
    received: int
    sent: int
    expected: int


@dataclass
class DemoResult:
    """What the demo saw: the probe's report plus what reached the peer."""

    mode: str
    request_ms: float
    netdev: str
    fds: list[int]
    per_queue: list[DemoQueue]
    replies_seen: int
    broker_caps: str

    @property
    def ok(self) -> bool:
        return all(q.received == q.expected for q in self.per_queue) and (
            self.replies_seen == sum(q.expected for q in self.per_queue)
        )


def _cap_eff(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        return next(line.split()[1] for line in status if line.startswith("CapEff:"))


def run_demo(
    queues: int = 4, frames: int = 16, mode: str = "auto", out: TextIO = sys.stdout
) -> DemoResult:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    workdir = public_tempdir("xskt-demo-")
    try:
        with VethLab(queues) as lab, bpffs() as bpf:
            say(
                f"lab: veth {lab.ifname_a} <-> {lab.ifname_b}, {queues} queues, "
                f"namespaces {lab.ns_a} and {lab.ns_b}, bpffs {bpf}"
            )
            with BrokerProcess(lab.ns_a, bpf / "pins", workdir) as broker:
                caps = _cap_eff(broker.pid)
                say(
                    f"broker: pid {broker.pid}, socket {broker.socket_path}, CapEff {caps} "
                    "(net_admin, net_raw, bpf)"
                )
                say(
                    f"consumer: uid {UNPRIVILEGED_UID} gid {UNPRIVILEGED_GID}, "
                    "no capabilities, no_new_privs; asks through the public client API"
                )
                return _exchange(lab, broker, queues, frames, mode, caps, say)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _exchange(
    lab: VethLab,
    broker: BrokerProcess,
    queues: int,
    frames: int,
    mode: str,
    caps: str,
    say: Callable[[str], None],
) -> DemoResult:
    # veth in skb mode cannot steer frames to its last rx queue (see netlab.steer_queue)
    asked = queues - 1 if mode == "skb" and queues > 1 else queues
    with (
        running_probe(
            broker, lab.ifname_a, asked, "--mode", mode, "--reply", "--expect", str(frames),
            duration=30.0,
        ) as probe,
        Capture(lab.b) as capture,
    ):  # fmt: skip
        say(
            f"lease: mode {probe.mode}, queues {probe.queues}; sending {frames} frames to "
            "each from the peer, steered by its tx queue"
        )
        for queue in probe.queues:
            tx = steer_queue(queue, probe.mode, queues)
            send_to_queue(lab.b, lab.a, tx, f"demo q={queue}", frames)
        replies = capture.frames(15.0, want=frames * len(probe.queues))
        report = probe.result()
    per_queue = [DemoQueue(q.queue, q.received, q.sent, frames) for q in report.queues]
    result = DemoResult(
        report.mode,
        report.request_ms,
        report.netdev,
        report.fds,
        per_queue,
        sum(f[14:].startswith(REPLY_PREFIX) for f in replies),
        caps,
    )
    say(f"request latency: {result.request_ms:.2f} ms; fds {result.fds}")
    say(f"netdev: {result.netdev}")
    for q in per_queue:
        say(f"  queue {q.queue}: received {q.received}/{q.expected}, sent {q.sent} replies")
    say(f"peer saw {result.replies_seen} replies; result: {'OK' if result.ok else 'FAILED'}")
    return result


def main(queues: int = 4, mode: str = "auto", json_output: bool = False) -> int:
    result = run_demo(queues, mode=mode, out=sys.stderr if json_output else sys.stdout)
    if json_output:
        print(json.dumps({**asdict(result), "ok": result.ok}))
    return 0 if result.ok else 1
