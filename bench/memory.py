"""Resident memory and open fds of a broker: idle, and after many request/consumer-exit cycles.

Run as root: .venv/bin/python bench/memory.py [--cycles N]. One cycle is what a VM's life
looks like to the broker, shortened: fork a child that waits on a pipe, request one queue
with consumer_pid=child, close the fds, let the child exit, reap it. The lease then ends by
the child's pidfd, as for a real consumer. Figures are taken once every lease has ended:
idle, after a warm-up (first attach and lazy imports done), and after each quarter of the
cycles, so growth that scales with the cycles shows apart from one-off allocations.
Goal ("Service core"): RSS after 10,000 cycles <= 30 MiB, and flat: no fd growth, and no
RSS growth after the first quarter beyond page noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from bench.goals import goal_line
from client.sync import Client
from lab.brokerproc import BrokerProcess, public_tempdir, wait_until
from lab.netlab import VethLab, bpffs

WARMUP = 200
GOAL_MIB = 30.0
NOISE_KIB = 256


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def cycle(client: Client, ifname: str) -> None:
    """One consumer's life: the child holds the lease until the pipe closes."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    try:
        client.request(ifname, 1, consumer_pid=child, umem_bytes=1 << 20).close()
    finally:
        os.close(write_end)
        os.waitpid(child, 0)


def settled(broker: BrokerProcess, client: Client) -> tuple[int, int]:
    """RSS (KiB) and fd count once every lease has ended and the loop is quiet."""
    wait_until(lambda: client.status().leases == [], timeout=30)
    time.sleep(0.2)
    return rss_kib(broker.pid), broker.fd_count()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10_000, help="request/exit cycles")
    opts = parser.parse_args()
    workdir = public_tempdir()
    try:
        with bpffs() as bpf_root, VethLab() as lab:
            rate = ("--rate-per-uid", "1000000")  # the bench is one uid asking fast, on purpose
            with BrokerProcess(lab.ns_a, bpf_root / "pins", workdir, *rate) as broker:
                client = broker.client()
                idle = settled(broker, client)
                for _ in range(WARMUP):
                    cycle(client, lab.ifname_a)
                points = [(f"after {WARMUP} warm-up cycles", settled(broker, client))]
                started = time.monotonic()
                for quarter in range(1, 5):
                    for _ in range(opts.cycles // 4):
                        cycle(client, lab.ifname_a)
                    label = f"after {quarter * (opts.cycles // 4)} more cycles"
                    points.append((label, settled(broker, client)))
                took = time.monotonic() - started
            shutil.rmtree(bpf_root / "pins", ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cycles = 4 * (opts.cycles // 4)
    print(f"broker memory and fds ({cycles} request/exit cycles in {took:.1f} s)")
    for label, (rss, fds) in [("idle, just started", idle), *points]:
        print(f"  {label:<28} RSS {rss / 1024:6.1f} MiB   fds {fds}")
    (_, warm), (_, first), (_, after) = points[0], points[1], points[-1]
    print(
        f"  growth over the last {cycles - cycles // 4} cycles: RSS {after[0] - first[0]:+d} KiB, "
        f"fds {after[1] - first[1]:+d}; over all {cycles}: RSS {after[0] - warm[0]:+d} KiB, "
        f"fds {after[1] - warm[1]:+d}"
    )
    final_mib = after[0] / 1024
    growth_kib = after[0] - first[0]
    flat = after[1] == warm[1] and growth_kib <= NOISE_KIB
    print(
        goal_line(
            f"RSS after {cycles} cycles <= 30 MiB and flat",
            f"{final_mib:.1f} MiB ({growth_kib:+d} KiB over the last {cycles - cycles // 4}, "
            f"fds {after[1] - warm[1]:+d} over all)",
            f"{GOAL_MIB:.0f} MiB and flat (<= {NOISE_KIB} KiB, fds +0)",
            final_mib <= GOAL_MIB and flat,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
