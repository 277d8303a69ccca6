"""Driving traffic through a lab: unprivileged probes, steered frames, captures."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from client.consumer import make_frame
from client.exchange import BROKER_UID_ENV
from client.probe import BoundEvent, ProbeReport
from lab.brokerproc import REPO, BrokerProcess
from lab.netlab import (
    DEFAULT_ENV,
    UNPRIVILEGED_UID,
    Endpoint,
    QueueSender,
    in_netns,
    spawn_unprivileged,
)

ETH_P_ALL = 0x0003
ETH_P_EXPERIMENTAL = 0x88B5


def client_env(broker: BrokerProcess) -> dict[str, str]:
    env = {**DEFAULT_ENV, "XSK_BROKER_SOCKET": str(broker.socket_path), "PYTHONPATH": str(REPO)}
    if broker.broker_uid is not None:
        env[BROKER_UID_ENV] = str(broker.broker_uid)
    return env


@dataclass
class RunningProbe:
    """An unprivileged `xsk-broker probe` that has bound its sockets and is listening."""

    proc: subprocess.Popen[str]
    queues: list[int]
    mode: str

    def result(self, timeout: float = 90.0) -> ProbeReport:
        """The probe's report (its last line of output) once it has finished."""
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"probe failed ({self.proc.returncode}): {err}"
        return ProbeReport.from_json(out.strip().splitlines()[-1])


@contextmanager
def running_probe(
    broker: BrokerProcess,
    ifname: str,
    queues: int,
    *args: str,
    duration: float = 60.0,
    uid: int = UNPRIVILEGED_UID,
    extra_groups: Sequence[int] = (),
) -> Iterator[RunningProbe]:
    """Start a probe as another uid with no capabilities and wait until it is bound."""
    argv = [
        sys.executable, "-m", "xsk_broker", "probe", "--ifname", ifname,
        "--queues", str(queues), "--send", "0", "--duration", str(duration), "--events", *args,
    ]  # fmt: skip
    proc = spawn_unprivileged(
        argv,
        uid,
        extra_groups=extra_groups,
        netns=broker.netns,
        env=client_env(broker),
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            proc.wait(timeout=10)
            stderr = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"probe exited before binding: {stderr}")
        bound: BoundEvent = json.loads(line)
        yield RunningProbe(proc, bound["queues"], bound["mode"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Capture:
    """An AF_PACKET socket on an endpoint, counting frames of the experimental ethertype."""

    def __init__(self, endpoint: Endpoint) -> None:
        with in_netns(endpoint.netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((endpoint.ifname, 0))
        self.sock.settimeout(0.05)

    def frames(self, duration: float, want: int | None = None) -> list[bytes]:
        """Frames of our ethertype received within duration (early out at `want`)."""
        found: list[bytes] = []
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline and (want is None or len(found) < want):
            try:
                frame, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING and frame[12:14] == b"\x88\xb5":
                found.append(frame)
        return found

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_to_queue(
    sender_end: Endpoint, target: Endpoint, tx_queue: int, label: str, count: int
) -> int:
    """Send count frames labelled `label n=i` from sender_end's tx queue to target's MAC."""
    frames = [
        make_frame(target.mac, sender_end.mac, f"{label} n={i}".encode()) for i in range(count)
    ]
    with QueueSender(sender_end, tx_queue) as sender:
        return sender.send(frames)


@contextmanager
def iperf_server(enter_netns: list[str], address: str) -> Iterator[None]:
    """`iperf3 -s` bound to address, run through enter_netns (an `ip netns exec NS` or
    `nsenter -t PID -n` prefix) for as long as the block runs."""
    server = subprocess.Popen(
        [*enter_netns, "iperf3", "-s", "-B", address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        server.kill()
        server.wait()
