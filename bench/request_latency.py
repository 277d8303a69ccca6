"""Request latency of a real broker against the raw kernel cost of the same work.

Run as root: `make bench` (or .venv/bin/python bench/request_latency.py [--rounds N]).
Prints p50/p99 for warm requests of 1, 4 and 64 queues, the first request on a fresh
interface, and the raw cost of socket + SO_BINDTODEVICE + map insert + SCM_RIGHTS send +
receive + close for the same queue counts, measured in this process, as the ratio
broker / raw. The kernel's XDP attach time is measured in the same run, interleaved with the
first requests: bpf_link_create of the XSK program on a fresh veth, in the mode the broker
chose. Goals ("Service core"): warm 4-queue p50 <= 3x raw; first request on a fresh
interface p99 <= 3x the kernel's attach time (p50).
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

from bench.goals import goal_line
from broker import bpf, fdpass, xdpprog, xsk
from broker.loader import MODE_FLAGS, Attachment
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
    attachment = Attachment(ifname, ifindex, "skb", queues, map_fd, -1, -1, 0, 0, Path(), False)
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


FRESH_SAMPLES = 20
FRESH_QUEUES = ["numrxqueues", "4", "numtxqueues", "4"]
RAW_FACTOR = 3.0
ATTACH_FACTOR = 3.0


def fresh_veth(netns: str, name: str) -> None:
    run(["ip", "-n", netns, "link", "add", name, *FRESH_QUEUES, "type", "veth",
         "peer", "name", f"{name}p", *FRESH_QUEUES])  # fmt: skip
    run(["ip", "-n", netns, "link", "set", name, "up"])


def first_request(client: Client, netns: str, name: str) -> tuple[float, str]:
    """A request on a veth the broker has never seen: attach included; (seconds, mode)."""
    fresh_veth(netns, name)
    started = time.perf_counter()
    lease = client.request(name, 4, umem_bytes=1 << 20)
    took = time.perf_counter() - started
    lease.close()
    client.release(lease.lease_id)
    return took, lease.mode


def kernel_attach(netns: str, name: str, mode: str) -> float:
    """The kernel's part alone: bpf_link_create of the loaded program on a fresh veth."""
    fresh_veth(netns, name)
    with in_netns(netns):
        ifindex = socket.if_nametoindex(name)
        map_fd = bpf.create_xskmap("bench", 4)
        outer_fd = bpf.create_map_of_maps("bench", map_fd, 4)
        prog_fd = xdpprog.load(outer_fd, map_fd)
        try:
            started = time.perf_counter()
            link_fd = bpf.create_xdp_link(prog_fd, ifindex, MODE_FLAGS[mode])
            took = time.perf_counter() - started
            os.close(link_fd)
        finally:
            os.close(prog_fd)
            os.close(outer_fd)
            os.close(map_fd)
    run(["ip", "-n", netns, "link", "del", name])
    return took


def fresh_interfaces(broker: BrokerProcess, netns: str) -> tuple[list[float], list[float]]:
    """First requests and bare kernel attaches, interleaved so both see the same machine."""
    client = broker.client()
    requests, attaches = [], []
    for i in range(FRESH_SAMPLES):
        took, mode = first_request(client, netns, f"xskt-bf{i}")
        requests.append(took)
        attaches.append(kernel_attach(netns, f"xskt-ka{i}", mode))
    return requests, attaches


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
            requests, attaches = fresh_interfaces(broker, lab.ns_a)
            results["first_request_fresh_interface"] = percentiles(requests)
            results["kernel_xdp_attach"] = percentiles(attaches)
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
    first = results["first_request_fresh_interface"]
    attach = results["kernel_xdp_attach"]
    assert isinstance(four, dict) and isinstance(first, dict) and isinstance(attach, dict)
    broker_p50, raw_p50 = four["broker"]["p50_ms"], four["raw"]["p50_ms"]
    print(
        goal_line(
            "warm 4-queue request p50 <= 3x raw kernel work",
            f"{broker_p50:.2f} ms",
            f"{RAW_FACTOR * raw_p50:.2f} ms (3 x {raw_p50:.2f})",
            broker_p50 <= RAW_FACTOR * raw_p50,
        )
    )
    print(
        goal_line(
            "first request on a fresh interface p99 <= 3x attach",
            f"{first['p99_ms']:.1f} ms",
            f"{ATTACH_FACTOR * attach['p50_ms']:.1f} ms (3 x {attach['p50_ms']:.1f})",
            first["p99_ms"] <= ATTACH_FACTOR * attach["p50_ms"],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
