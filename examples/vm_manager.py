#!/usr/bin/env python3
"""A minimal VM manager: start QEMU on broker sockets, then hot-plug a second AF_XDP NIC.

    python3 vm_manager.py IFNAME [--qemu BINARY] [QEMU ARGS...]

Queue 0 of IFNAME is QEMU's first NIC, given as inherited fds on the command line; queue 1
is hot-plugged over QMP as net1 (getfd, netdev_add, device_add, undone on failure). The
first lease's consumer is this manager (QEMU's pid does not exist when the fds must be
inherited), the hot-plugged one's is QEMU. Nothing here needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

from broker.protocol import Request
from client.aio import AsyncClient
from client.qmp import QmpError, attach


async def wait_for(path: str, proc: asyncio.subprocess.Process) -> None:
    while not os.path.exists(path):
        if proc.returncode is not None:
            raise SystemExit(f"QEMU exited with {proc.returncode} before opening QMP")
        await asyncio.sleep(0.02)


async def run_vm(ifname: str, qemu: str, extra: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="vm-") as rundir:
        return await run_vm_in(rundir, ifname, qemu, extra)


async def run_vm_in(rundir: str, ifname: str, qemu: str, extra: list[str]) -> int:
    qmp_path = os.path.join(rundir, "qmp.sock")
    with await AsyncClient().request(ifname, queues=1, start_queue=0, tag="vm-net0") as lease:
        lease.make_inheritable()
        proc = await asyncio.create_subprocess_exec(
            qemu, "-machine", "q35", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-netdev", lease.netdev_arg("net0"), "-device", "virtio-net-pci,netdev=net0",
            *extra, pass_fds=lease.fds,
        )  # fmt: skip
    await wait_for(qmp_path, proc)
    try:
        nic = await attach(qmp_path, Request(ifname, queues=1, start_queue=1), "net1")
    except QmpError as error:
        print(f"hot-plug of net1 failed: {error}", file=sys.stderr)
        proc.terminate()
        await proc.wait()
        return 1
    print(f"net1: queues {nic.lease.queue_ids} of {ifname} ({nic.lease.mode}) as {nic.device_id}")
    return await proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ifname")
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    opts, extra = parser.parse_known_args()
    return asyncio.run(run_vm(opts.ifname, opts.qemu, extra))


if __name__ == "__main__":
    sys.exit(main())
