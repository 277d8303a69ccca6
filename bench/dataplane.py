"""Data-plane parity: one tiny guest, its NIC made of af-xdp sockets two ways.

- self: QEMU as root sets up af-xdp itself (libxdp loads its program, makes and binds the
  socket; no inhibit=on);
- brokered: QEMU as an unprivileged uid (CAP_IPC_LOCK only) on sockets from xsk-broker.

Each run boots the guest on a fresh veth pair and measures, from inside the guest, iperf3
TCP to and from the peer and 64-byte UDP packets per second to and from the peer. Cases
alternate within each round; medians over rounds, with the spread (min-max) since guests
run under TCG here and vary by about +-30%. Goal (issue 8): brokered/self >= 0.95.

Run as root: `make bench`, or .venv/bin/python -m bench.dataplane [--rounds N] [--seconds S].
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from lab.brokerproc import BrokerProcess, public_tempdir
from lab.guest import GuestImage, ensure_guest
from lab.netlab import DEFAULT_ENV, VethLab, bpffs
from lab.qemu import AfxdpQemu, ensure_qemu
from lab.traffic import client_env, iperf_server
from lab.vm import GUEST_IP, PEER_IP, Vm, as_qemu_user, prepare_peer

METRICS = {
    "tcp_up": "-t {s}",
    "tcp_down": "-t {s} -R",
    "udp64_up": "-t {s} -u -l 64 -b 0",
    "udp64_down": "-t {s} -u -l 64 -b 0 -R",
}
UNITS = {"tcp_up": "Mbit/s", "tcp_down": "Mbit/s", "udp64_up": "kpps", "udp64_down": "kpps"}
NIC = ["-device", "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:02"]


def guest_script(seconds: int) -> str:
    """iperf3 runs whose JSON reports go to the console between markers."""
    lines = [f"ping -c 1 -W 5 {PEER_IP} >/dev/null"]
    for name, args in METRICS.items():
        lines.append(f"echo BEGIN-{name}; iperf3 -c {PEER_IP} -J {args.format(s=seconds)}")
        lines.append(f"echo END-{name}")
    return "\n".join(lines) + "\n"


def figure(name: str, report: dict[str, Any]) -> float:
    """TCP: received Mbit/s. UDP: packets per second that reached the receiver, in k."""
    end = report["end"]
    if name.startswith("tcp"):
        return float(end["sum_received"]["bits_per_second"]) / 1e6
    received = end.get("sum_received") or end["sum"]
    packets = received["packets"] - received.get("lost_packets", 0)
    return float(packets) / float(received["seconds"]) / 1e3


def parse(console: str) -> dict[str, float]:
    found = {}
    for name in METRICS:
        block = re.search(rf"BEGIN-{name}\r?\n(.*?)END-{name}", console, re.DOTALL)
        if block is None:
            raise RuntimeError(f"guest printed no {name} report:\n{console[-2000:]}")
        found[name] = figure(name, json.loads(block.group(1)))
    return found


def run_guest(
    argv: list[str], lab: VethLab, env: dict[str, str], workdir: Path
) -> dict[str, float]:
    with (
        iperf_server(["ip", "netns", "exec", lab.ns_b], PEER_IP),
        Vm(argv, lab.ns_a, workdir, env, "bench") as vm,
    ):
        vm.wait_for(r"^XSKT-EXIT (\d+)", 300)
        vm.wait_exit(30)
        return parse(vm.output())


def self_managed(
    qemu: AfxdpQemu, guest: GuestImage, mode: str, script: str, workdir: Path
) -> dict[str, float]:
    """QEMU as root: libxdp loads its own program and binds the socket."""
    with VethLab(queues=1) as lab:
        prepare_peer(lab.ns_b, lab.ifname_b)
        netdev = f"af-xdp,id=net0,ifname={lab.ifname_a},mode={mode},queues=1"
        argv = [*qemu.argv(), *guest.qemu_args(script, ip=f"{GUEST_IP}/24"), *NIC,
                "-netdev", netdev]  # fmt: skip
        return run_guest(argv, lab, {**DEFAULT_ENV, **qemu.env()}, workdir)


def brokered(
    qemu: AfxdpQemu, guest: GuestImage, mode: str, script: str, workdir: Path
) -> dict[str, float]:
    """QEMU unprivileged through `xsk-broker request`."""
    with VethLab(queues=1) as lab, bpffs() as bpf:
        prepare_peer(lab.ns_b, lab.ifname_b)
        with BrokerProcess(lab.ns_a, bpf / "pins", workdir) as broker:
            argv = as_qemu_user(
                [sys.executable, "-m", "xsk_broker", "request", "--ifname", lab.ifname_a,
                 "--queues", "1", "--mode", mode, "--", *qemu.argv(),
                 *guest.qemu_args(script, ip=f"{GUEST_IP}/24"), *NIC, "-netdev", "{netdev}"]
            )  # fmt: skip
            return run_guest(argv, lab, client_env(broker), workdir)


CASES = {"self": self_managed, "brokered": brokered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3, help="length of each iperf3 run")
    parser.add_argument("--modes", default="skb,native")
    opts = parser.parse_args()
    qemu, guest = ensure_qemu(), ensure_guest()
    script = guest_script(opts.seconds)
    workdir = public_tempdir("xskt-bench-")
    rows = []
    try:
        for mode in opts.modes.split(","):
            samples: dict[str, dict[str, list[float]]] = {
                c: {m: [] for m in METRICS} for c in CASES
            }
            for round_no in range(opts.rounds):
                order = list(CASES) if round_no % 2 == 0 else list(reversed(CASES))
                for case in order:
                    figures = CASES[case](qemu, guest, mode, script, workdir)
                    print(f"{mode} round {round_no} {case}: {figures}", file=sys.stderr)
                    for metric, value in figures.items():
                        samples[case][metric].append(value)
            rows += summarize(mode, samples)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'mode':7} {'metric':11} {'self':>22} {'brokered':>22} {'ratio':>6}")
    for row in rows:
        print(row)


def summarize(mode: str, samples: dict[str, dict[str, list[float]]]) -> list[str]:
    rows = []
    for metric, unit in UNITS.items():
        mine, theirs = samples["brokered"][metric], samples["self"][metric]
        ratio = statistics.median(mine) / statistics.median(theirs)
        rows.append(
            f"{mode:7} {metric:11} {spread(theirs, unit):>22} {spread(mine, unit):>22} {ratio:6.2f}"
        )
    return rows


def spread(values: list[float], unit: str) -> str:
    """median [min-max] unit"""
    return f"{statistics.median(values):.1f} [{min(values):.0f}-{max(values):.0f}] {unit}"


if __name__ == "__main__":
    main()
