"""Taking the program off an interface: only for admins, never under a live lease unasked."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import actor, pins_of, run_captured, xdp_of, xsk_cli

from broker.errors import LeasesLive
from lab.brokerproc import REPO, BrokerProcess, wait_until
from lab.netlab import VethLab, enter_netns, run, run_unprivileged
from lab.traffic import client_env, running_probe

pytestmark = pytest.mark.kernel


def cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return xsk_cli(*args, "--socket", str(broker.socket_path))


def test_detach_is_refused_under_a_live_lease_then_forced(
    broker4: BrokerProcess, lab4: VethLab, pin_root: Path
) -> None:
    client = broker4.client()
    with running_probe(broker4, lab4.ifname_a, 2) as probe:
        with pytest.raises(LeasesLive, match=f"pid {probe.proc.pid}"):
            client.detach(lab4.ifname_a)
        assert xdp_of(lab4) and pins_of(lab4, pin_root)

        denied = run_unprivileged(
            [sys.executable, "-m", "xsk_broker", "detach", "--ifname", lab4.ifname_a, "--force"],
            netns=lab4.ns_a, env=client_env(broker4), cwd=str(REPO),
        )  # fmt: skip
        assert denied.returncode == 1
        assert denied.stderr.startswith("DENIED: uid 61000")
        assert "admin = true for detach" in denied.stderr
        assert xdp_of(lab4)

        forced = cli(broker4, "detach", "--ifname", lab4.ifname_a, "--force", "--json")
        assert forced.returncode == 0, forced.stderr
        assert json.loads(forced.stdout) == {"ifname": lab4.ifname_a, "was_attached": True}
    assert xdp_of(lab4) == {}
    assert pins_of(lab4, pin_root) == []
    assert client.status().leases == []
    again = cli(broker4, "detach", "--ifname", lab4.ifname_a)
    assert again.returncode == 0 and "had no program attached" in again.stdout
    with client.request(lab4.ifname_a, 4, umem_bytes=1 << 20) as lease:
        assert lease.mode == "native" and xdp_of(lab4)


def test_broker_mounts_bpffs_when_none_is_mounted() -> None:
    """In a private mount namespace with /sys/fs/bpf unmounted, so the host keeps its own."""
    script = 'umount /sys/fs/bpf 2>/dev/null; exec "$@"'
    result = run_captured(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         *actor("mount_bpffs")]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "before": False,
        "after": True,
        "dir": True,
        "mode": "1700",  # bpffs sets the sticky bit on its root whatever mode= says
    }


def test_removed_interface_ends_its_leases_and_pins_and_a_new_one_works(
    broker4: BrokerProcess, lab4: VethLab, pin_root: Path
) -> None:
    client = broker4.client()
    with running_probe(broker4, lab4.ifname_a, 2, "--tag", "doomed"):
        assert pins_of(lab4, pin_root)
        run(["ip", "-n", lab4.ns_a, "link", "del", lab4.ifname_a])
        wait_until(lambda: client.status().leases == [])
    assert pins_of(lab4, pin_root) == []
    assert client.status().attachments == []
    queues = ["numrxqueues", "4", "numtxqueues", "4"]
    run(["ip", "-n", lab4.ns_a, "link", "add", lab4.ifname_a, *queues, "type", "veth",
         "peer", "name", lab4.ifname_b, "netns", lab4.ns_b, *queues])  # fmt: skip
    run(["ip", "-n", lab4.ns_a, "link", "set", lab4.ifname_a, "up"])
    with client.request(lab4.ifname_a, 4, umem_bytes=1 << 20) as lease:
        assert lease.queue_ids == [0, 1, 2, 3] and xdp_of(lab4)
    assert "event=expired" in broker4.log() and "was removed" in broker4.log()


def test_adoption_that_cannot_open_the_pins_keeps_them(
    broker4: BrokerProcess, lab4: VethLab, pin_root: Path
) -> None:
    """EMFILE (or ENOMEM) says nothing about the link: its pins must stay, or every VM on
    the interface would lose its program."""
    with broker4.client().request(lab4.ifname_a, 1, umem_bytes=1 << 20) as lease:
        ifindex = lease.ifindex
    before = pins_of(lab4, pin_root)
    result = run_captured(
        actor("adopt_without_fds", str(pin_root), str(ifindex)),
        preexec_fn=lambda: enter_netns(lab4.ns_a),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"code": "ATTACH_FAILED", "errno": errno.EMFILE}
    assert pins_of(lab4, pin_root) == before and before
    assert xdp_of(lab4)
