"""DPDK receive rate through the broker against DPDK on its own, in the same run.

- brokered: dpdk-testpmd rxonly as uid 61000 with CAP_NET_RAW and CAP_IPC_LOCK only, on a
  map lease (`xsk-broker request --handout map`, use_cni=1: the broker's program and map);
- self: the same testpmd as root, its af_xdp PMD loading libxdp's default program itself.

Each round gives each case a fresh one-queue veth pair in native mode; a generator testpmd
(txonly, root) on the peer sends for --seconds while the receiver counts. The two use
different lcores (generator forwards on cpu 0, receiver on cpu 1). Cases alternate within
each round; the verdict is the median of the per-round ratios.
Goal (issue 11): brokered/self >= 0.95.

Run as root: .venv/bin/python -m bench.dpdk_rx [--rounds N] [--seconds S].
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import time
from pathlib import Path

from bench.goals import goal_line
from lab.brokerproc import BrokerProcess, public_tempdir
from lab.dpdk import Dpdk, PmdRun, ensure_dpdk, pmd_args, port_stats
from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID, VethLab, bpffs, enter_netns

GOAL = 0.95
CAPS = "ipc_lock,+net_raw"


def _lcores(args: list[str], main: int) -> list[str]:
    """pmd_args with the main lcore set: the other of the two cpus forwards."""
    at = args.index("-l") + 2
    return [*args[:at], "--main-lcore", str(main), f"--file-prefix=xskt{main}", *args[at:]]


def _as_consumer(argv: list[str]) -> list[str]:
    return [
        "setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_GID}",
        "--clear-groups", f"--inh-caps=-all,+{CAPS}", f"--ambient-caps=-all,+{CAPS}",
        f"--bounding-set=-all,+{CAPS}", "--no-new-privs", "--pdeathsig=KILL", "--", *argv,
    ]  # fmt: skip


def _receive(dpdk: Dpdk, lab: VethLab, receiver: list[str], seconds: float) -> tuple[int, int]:
    """(received by the receiver, sent by the generator) while the generator runs."""
    env = {"LIBXDP_OBJECT_PATH": str(dpdk.bpf_objects), "PATH": "/usr/bin:/bin"}
    rx = PmdRun(receiver, env=env, preexec_fn=lambda: enter_netns(lab.ns_a))
    try:
        if not rx.started():
            raise RuntimeError(f"receiver did not start:\n{rx.output[-3000:]}")
        vdev = f"net_af_xdp0,iface={lab.ifname_b},start_queue=0,queue_count=1"
        generator = dpdk.testpmd() + _lcores(pmd_args([vdev], "txonly"), main=1)
        tx = PmdRun(generator, env=env, preexec_fn=lambda: enter_netns(lab.ns_b))
        try:
            if not tx.started():
                raise RuntimeError(f"generator did not start:\n{tx.output[-3000:]}")
            time.sleep(seconds)
        finally:
            sent = port_stats(tx.stop()).get(0, (0, 0))[1]
        time.sleep(0.2)
    finally:
        received = port_stats(rx.stop()).get(0, (0, 0))[0]
    return received, sent


def _round(dpdk: Dpdk, case: str, seconds: float) -> tuple[int, int]:
    with VethLab(queues=1) as lab:
        if case == "self":
            vdev = f"net_af_xdp0,iface={lab.ifname_a},start_queue=0,queue_count=1"
            receiver = dpdk.testpmd() + _lcores(pmd_args([vdev], "rxonly"), main=0)
            return _receive(dpdk, lab, receiver, seconds)
        work = public_tempdir()
        with contextlib.ExitStack() as undo:
            undo.callback(shutil.rmtree, work, ignore_errors=True)
            pins = undo.enter_context(bpffs())
            with BrokerProcess(lab.ns_a, pins / "xsk-broker", work) as broker:
                vdev = f"net_af_xdp0,iface={lab.ifname_a},start_queue=0,queue_count=1,use_cni=1"
                command = dpdk.testpmd() + _lcores(
                    pmd_args([vdev + ",dp_path={dp-path}"], "rxonly"), main=0
                )
                request = [
                    "python3", "-m", "xsk_broker", "request", "--socket",
                    str(broker.socket_path), "--ifname", lab.ifname_a, "--queues", "1",
                    "--handout", "map", "--mode", "native", "--", *command,
                ]  # fmt: skip
                request[0] = str(Path(".venv/bin/python").resolve())
                return _receive(dpdk, lab, _as_consumer(request), seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    opts = parser.parse_args()
    dpdk = ensure_dpdk()
    rates: dict[str, list[float]] = {"self": [], "brokered": []}
    delivered: dict[str, list[float]] = {"self": [], "brokered": []}
    for n in range(opts.rounds):
        for case in ("self", "brokered") if n % 2 == 0 else ("brokered", "self"):
            received, sent = _round(dpdk, case, opts.seconds)
            rates[case].append(received / opts.seconds)
            delivered[case].append(received / sent if sent else 0.0)
            print(
                f"round {n + 1} {case:<9} rx {received / opts.seconds / 1e3:8.1f} kpps "
                f"(generator {sent / opts.seconds / 1e3:8.1f} kpps)",
                flush=True,
            )
    medians = {case: statistics.median(values) for case, values in rates.items()}
    for case, values in rates.items():
        print(
            f"{case:<9} median {medians[case] / 1e3:8.1f} kpps "
            f"(min {min(values) / 1e3:.1f}, max {max(values) / 1e3:.1f}); received of sent: "
            f"median {statistics.median(delivered[case]):.3f}"
        )
    # The load of other processes on this VM drifts; the two runs of a round are adjacent,
    # so the median of per-round ratios is steadier than the ratio of medians. Where the
    # generator, not the receiver, sets the rate, received-of-sent says whether the
    # receiver kept up, which the generator's own drift does not blur.
    pairs = [b / s for b, s in zip(rates["brokered"], rates["self"], strict=True) if s]
    ratio = statistics.median(pairs) if pairs else 0.0
    print(f"per-round brokered/self: {', '.join(f'{r:.3f}' for r in pairs)}")
    print(goal_line("DPDK testpmd rxonly pps, brokered/self (issue 11)", f"{ratio:.3f}",
                    f">= {GOAL}", ratio >= GOAL))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
