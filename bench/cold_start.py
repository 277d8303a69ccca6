"""Cold start under socket activation: first connection to the reply with fds.

Run as root: .venv/bin/python bench/cold_start.py [--rounds N]. Each round starts
`systemd-socket-activate --seqpacket` in a lab namespace, which listens and execs
`xsk-broker serve --idle-exit 1` on the first connection, exactly as systemd would; the timed
1-queue request is that first connection. The lease is released, and the round ends when the
broker has exited for idleness. Two cases: "adopted" (an earlier broker attached and pinned
the program, so start-up adopts the pins) and "fresh" (a new interface each round, so the
program is loaded and attached in the request). Baselines from the same run:
`/usr/bin/python3 -c pass` (Debian's, which the venv is built on; a pyenv shim first on PATH
would add ~70 ms) and the venv's python. Goal ("Service core"): adopted cold reply p50
<= 60 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.goals import goal_line
from client.sync import Client
from lab.brokerproc import activated_broker, public_tempdir
from lab.netlab import VethLab, bpffs

GOAL_MS = 60.0


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"p50 {statistics.median(ms):7.1f} ms   max {ms[-1]:7.1f} ms   (n={len(ms)})"


def process_start(argv: list[str], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(argv, check=True)
        samples.append(time.perf_counter() - started)
    return samples


def cold_request(netns: str, ifname: str, pin_dir: Path, workdir: Path) -> float:
    """One cold start: connect, request one queue, time until the fds are here."""
    with activated_broker(netns, pin_dir, workdir) as sock:
        client = Client(sock)
        started = time.perf_counter()
        lease = client.request(ifname, 1, umem_bytes=1 << 20)
        took = time.perf_counter() - started
        lease.close()
        client.release(lease.lease_id)
    return took


def rounds_of(measure: Callable[[], float], rounds: int) -> list[float]:
    return [measure() for _ in range(rounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="cold starts per case")
    opts = parser.parse_args()
    with bpffs() as bpf_root:
        pin_dir = bpf_root / "pins"
        workdir = public_tempdir()
        try:
            with VethLab() as lab:
                # The first broker attaches and pins; every timed round after adopts.
                cold_request(lab.ns_a, lab.ifname_a, pin_dir, workdir)
                adopted = rounds_of(
                    lambda: cold_request(lab.ns_a, lab.ifname_a, pin_dir, workdir), opts.rounds
                )

            def fresh_round() -> float:
                with VethLab() as fresh:
                    return cold_request(fresh.ns_a, fresh.ifname_a, pin_dir, workdir)

            fresh = rounds_of(fresh_round, opts.rounds)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(pin_dir, ignore_errors=True)
    python3 = process_start(["/usr/bin/python3", "-c", "pass"], 10)
    venv_python = process_start([sys.executable, "-c", "pass"], 10)
    print("cold start under socket activation, connect -> reply with 1 fd")
    print(f"  adopted attachment        {summary(adopted)}")
    print(f"  fresh interface           {summary(fresh)}")
    print(f"  /usr/bin/python3 -c pass  {summary(python3)}")
    print(f"  .venv python -c pass      {summary(venv_python)}")
    p50 = statistics.median(adopted) * 1000
    print(
        goal_line(
            "cold start, adopted attachment, p50 <= 60 ms",
            f"{p50:.1f} ms",
            f"{GOAL_MS:.0f} ms",
            p50 <= GOAL_MS,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
