"""What metrics cost the broker: one write of the textfile, and the hooks on each message.

Run: .venv/bin/python -m bench.metrics_write [--writes N]. No root needed. The figures set
metrics.WRITE_INTERVAL: a write (render, temp file, fsync, rename) runs at most once a
second, from the loop after its replies went out, so its cost bounds the share of the loop
that metrics can take. State written: 16 interfaces, 256 leases, 6 operations with latency
histograms, 10 refusal codes, 32 memlock shortfalls; on /run (tmpfs, where the state
directory is) and on the disk holding /var/tmp (where a textfile directory usually is).
Goal: a write <= 10 ms (1 % of the loop at one write a second), and the per-message hooks
<= 10 us.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.goals import goal_line
from bench.request_latency import timed
from broker.core import NO_OP
from broker.errors import BrokerError, MemlockExceeded
from broker.metrics import WRITE_INTERVAL, Metrics
from broker.protocol import AttachmentInfo, Granted, LeaseInfo, Pong

GOAL_WRITE_MS = 10.0
GOAL_HOOK_US = 10.0
CODES = ["QUEUE_BUSY", "DENIED", "MEMLOCK", "BAD_QUEUES", "NO_SUCH_DEVICE", "RATE_LIMITED"]
CODES += ["BAD_MESSAGE", "NO_SUCH_LEASE", "CONSUMER_GONE", "XDP_CONFLICT"]
OPS = ("request", "release", "status", "ping", "revoke", "detach")


def busy_state() -> tuple[list[AttachmentInfo], list[LeaseInfo]]:
    attachments = [
        AttachmentInfo(f"eth{i}", i + 2, "native", 64, 1, 1, "/p", False) for i in range(16)
    ]
    leases = [
        LeaseInfo(f"{n:012x}", f"eth{n % 16}", n % 16 + 2, [n // 16], "native", 1000, 1, 1,
                  None, 1 << 20, 0.0, 107, "vms")
        for n in range(256)
    ]  # fmt: skip
    return attachments, leases


def filled(directory: Path) -> Metrics:
    state = busy_state()
    metrics = Metrics(directory / "xsk-broker.prom", directory, lambda: state)
    for i, op in enumerate(OPS):
        metrics.answered(op, 0.0001 * (i + 1))
    for code in CODES:
        metrics.refusals[("request", code)] += 1
    for uid in range(32):
        metrics.shortfalls[10_000 + uid] = 1 << 20
    for lease in state[1][:16]:
        metrics.decided("request", Granted(lease))
    return metrics


def report_writes(where: str, directory: Path, writes: int) -> float:
    metrics = filled(directory)
    size = len(metrics.render())
    ms = sorted(s * 1000 for s in timed(metrics.write, writes))
    p50, p99 = statistics.median(ms), ms[int(len(ms) * 0.99) - 1]
    print(f"write on {where:<28} {size:6d} bytes   p50 {p50:6.3f} ms   p99 {p99:6.3f} ms")
    return p99


def report_hooks(rounds: int) -> float:
    """decided() plus answered(): what each message adds when metrics are on."""
    with tempfile.TemporaryDirectory() as directory:
        metrics = filled(Path(directory))
        pong, refusal = Pong("1", 1), MemlockExceeded("short", details={"uid": 1})
        errors: list[BrokerError] = [refusal]

        def hooks() -> None:
            metrics.decided("ping", pong)
            metrics.decided(NO_OP, errors[0])
            metrics.answered("ping", 0.0001)

        us = sorted(s * 1e6 for s in timed(hooks, rounds))
    p50 = statistics.median(us)
    print(f"hooks per message (decided + answered)  p50 {p50:6.2f} us")
    return p50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500, help="writes timed per place")
    opts = parser.parse_args()
    worst = 0.0
    for where, base in (("/run (tmpfs)", Path("/run")), ("/var/tmp (disk)", Path("/var/tmp"))):
        directory = Path(tempfile.mkdtemp(prefix="xskt-metrics-", dir=base))
        try:
            worst = max(worst, report_writes(f"{where}", directory, opts.writes))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    hook_us = report_hooks(opts.writes * 20)
    share = worst / (WRITE_INTERVAL * 1000) * 100
    print(
        goal_line(
            "metrics write p99 (at most 1/s)", f"{worst:.2f} ms", "<= 10 ms", worst <= GOAL_WRITE_MS
        )
    )
    print(f"     that is {share:.2f} % of the loop at one write per {WRITE_INTERVAL:g} s")
    print(
        goal_line(
            "metrics hooks per message p50",
            f"{hook_us:.2f} us",
            "<= 10 us",
            hook_us <= GOAL_HOOK_US,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
