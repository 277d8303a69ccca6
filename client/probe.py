"""Prove a lease works: get sockets from the broker, bind each as QEMU would, move frames.

Used by `xsk-broker probe` against a real interface, and run as an unprivileged process
by the demo and the tests. It uses only the public client API and the pure-Python consumer,
so whatever it proves holds for any unprivileged caller.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypedDict, Unpack

from broker.protocol import Request
from client.consumer import FRAME_SIZE, XskSocket, make_frame
from client.lease import Lease
from client.sync import Client

PROBE_SRC_MAC = "02:78:73:6b:00:01"  # locally administered, "xsk"
BROADCAST = "ff:ff:ff:ff:ff:ff"
REPLY_PREFIX = b"reply:"


@dataclass
class QueueReport:
    queue: int
    received: int = 0
    sent: int = 0
    payloads: list[str] = field(default_factory=list)


class BoundEvent(TypedDict):
    """The line announce_bound() prints once every socket is bound."""

    event: str
    mode: str
    queues: list[int]


class ExerciseOptions(TypedDict, total=False):
    """exercise()'s keyword arguments besides frames, as probe() passes them on."""

    duration: float
    expect: int
    reply: bool
    send: int
    on_bound: Callable[[Lease, list[XskSocket]], None] | None


@dataclass
class ProbeReport:
    lease_id: str
    ifname: str
    ifindex: int
    mode: str
    fds: list[int]
    netdev: str
    request_ms: float
    queues: list[QueueReport]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ProbeReport:
        """What to_json() printed, read back by whoever ran the probe as another uid."""
        body = json.loads(text)
        return cls(**{**body, "queues": [QueueReport(**q) for q in body["queues"]]})


def _reply_to(frame: bytes) -> bytes:
    """Swap the MACs and prefix the payload, so the sender can tell replies apart."""
    return make_frame(
        frame[6:12], frame[0:6], REPLY_PREFIX + frame[14:], int.from_bytes(frame[12:14])
    )


def exercise(
    lease: Lease,
    *,
    frames: int = 256,
    duration: float = 2.0,
    expect: int = 0,
    reply: bool = False,
    send: int = 0,
    on_bound: Callable[[Lease, list[XskSocket]], None] | None = None,
) -> list[QueueReport]:
    """Bind every fd of the lease, send `send` frames per queue, then count what arrives.

    Stops after `duration` seconds, or as soon as every queue has received `expect` frames.
    """
    sockets: list[XskSocket] = []
    try:
        for fd, queue in zip(lease.fds, lease.queue_ids, strict=True):
            sockets.append(XskSocket(fd, lease.ifindex, queue, frames=frames))
        if on_bound is not None:
            on_bound(lease, sockets)
        reports = [QueueReport(queue) for queue in lease.queue_ids]
        for xsk, report in zip(sockets, reports, strict=True):
            probes = [
                make_frame(BROADCAST, PROBE_SRC_MAC, f"xsk-probe q={report.queue} n={n}".encode())
                for n in range(send)
            ]
            report.sent += xsk.send(probes) if probes else 0
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            if expect and all(r.received >= expect for r in reports):
                break
            for xsk, report in zip(sockets, reports, strict=True):
                received = xsk.receive(timeout=0.005)
                report.received += len(received)
                report.payloads.extend(f[14:].decode(errors="replace") for f in received[:8])
                if reply and received:
                    report.sent += xsk.send([_reply_to(f) for f in received])
        return reports
    finally:
        for xsk in sockets:
            xsk.close()


def probe(
    client: Client,
    request: Request,
    *,
    frames: int = 256,
    **exercise_args: Unpack[ExerciseOptions],
) -> ProbeReport:
    """Request, bind, move frames; the UMEM declared to the broker is the one registered."""
    started = time.perf_counter()
    lease = client.lease(dataclasses.replace(request, umem_bytes=frames * FRAME_SIZE))
    request_ms = (time.perf_counter() - started) * 1000
    with lease:
        reports = exercise(lease, frames=frames, **exercise_args)
        return ProbeReport(
            lease.lease_id,
            lease.ifname,
            lease.ifindex,
            lease.mode,
            list(lease.fds),
            lease.netdev_arg(),
            round(request_ms, 3),
            reports,
        )


def announce_bound(lease: Lease, sockets: list[XskSocket]) -> None:
    """For a parent process: one JSON line once every socket is bound."""
    event: BoundEvent = {
        "event": "bound",
        "mode": lease.mode,
        "queues": [s.queue_id for s in sockets],
    }
    print(json.dumps(event), flush=True)
