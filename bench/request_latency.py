"""Request latency of a real broker against the raw kernel cost of the same work.

Run as root: `make bench` (or .venv/bin/python bench/request_latency.py [--rounds N]).
Prints p50/p99 for warm requests of 1, 4 and 64 queues, the first request on a fresh
interface, and the raw cost of socket + SO_BINDTODEVICE + map insert + SCM_RIGHTS send +
receive + close for the same queue counts, measured in this process, as the ratio
broker / raw. Goal (issue 2): warm 4-queue p50 under 1 ms and within 5x of raw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from broker import bpf, fdpass, xsk
from broker.loader import Attachment
from client.sync import Client
from lab.brokerproc import BrokerProcess, public_tempdir
from lab.netlab import VethLab, bpffs, in_netns, run


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "n": len(ordered),
    }


def timed(action: Callable[[], None], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def warm_request(
    client: Client, ifname: str, queues: int, rounds: int, pause: float = 0.0
) -> list[float]:
    """Request, then close and release outside the timing, so the queues are free again."""
    samples = []
    for _ in range(rounds):
        time.sleep(pause)
        started = time.perf_counter()
        lease = client.request(ifname, queues, umem_bytes=1 << 20)
        samples.append(time.perf_counter() - started)
        lease.close()
        client.release(lease.lease_id)
    return samples


def raw_cost(netns: str, ifname: str, queues: int, rounds: int) -> list[float]:
    """The kernel work of one request done directly: the floor the broker is measured on."""
    with in_netns(netns):
        ifindex = socket.if_nametoindex(ifname)
        map_fd = bpf.create_xskmap("bench", queues)
    attachment = Attachment(ifname, ifindex, "skb", queues, map_fd, -1, 0, 0, Path(), False)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def once() -> None:
        with in_netns(netns):
            fds = xsk.create_sockets(attachment, list(range(queues)))
        fdpass.send(left, b"{}", fds)
        fdpass.close_all(fds)
        fdpass.close_all(fdpass.receive(right, queues).fds)

    try:
        return timed(once, rounds)
    finally:
        left.close()
        right.close()
        os.close(map_fd)


def first_request(broker: BrokerProcess, netns: str, samples: int) -> list[float]:
    """A fresh veth each time: attach (and, the first time, netlink's import) included."""
    client = broker.client()
    times = []
    for i in range(samples):
        name = f"xskt-bf{i}"
        queues = ["numrxqueues", "4", "numtxqueues", "4"]
        run(["ip", "-n", netns, "link", "add", name, *queues, "type", "veth",
             "peer", "name", f"{name}p", *queues])  # fmt: skip
        run(["ip", "-n", netns, "link", "set", name, "up"])
        started = time.perf_counter()
        lease = client.request(name, 4, umem_bytes=1 << 20)
        times.append(time.perf_counter() - started)
        lease.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    opts = parser.parse_args()
    results: dict[str, object] = {}
    workdir = public_tempdir("xskt-bench-")
    try:
        with (
            VethLab(queues=64) as lab,
            bpffs() as pins,
            BrokerProcess(lab.ns_a, pins / "pins", workdir, "--rate-per-uid", "1e6") as broker,
        ):
            results["first_request_fresh_interface"] = percentiles(
                first_request(broker, lab.ns_a, 5)
            )
            client = broker.client()
            warm_request(client, lab.ifname_a, 1, 1)  # attach once
            for queues in (1, 4, 64):
                rounds = opts.rounds if queues < 64 else max(20, opts.rounds // 8)
                warm = percentiles(warm_request(client, lab.ifname_a, queues, rounds))
                raw = percentiles(raw_cost(lab.ns_a, lab.ifname_a, queues, rounds))
                results[f"warm_{queues}q"] = {
                    "broker": warm,
                    "raw": raw,
                    "ratio_p50": round(warm["p50_ms"] / raw["p50_ms"], 2),
                }
            results["broker_fds_after"] = broker.fd_count()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, value in results.items():
        print(f"{name}: {json.dumps(value)}")
    four = results["warm_4q"]
    assert isinstance(four, dict)
    verdict = four["broker"]["p50_ms"] < 1.0 and four["ratio_p50"] <= 5.0
    print(f"goal (4 queues warm p50 < 1 ms and <= 5x raw): {'met' if verdict else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
