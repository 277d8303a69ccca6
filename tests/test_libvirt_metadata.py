"""What a domain's <metadata> declares, as libvirt-watch reads it (no libvirtd needed; the
watcher itself runs against the real one in test_libvirt.py)."""

from __future__ import annotations

import pytest

from broker.protocol import Request
from client.libvirt import LibvirtError
from xsk_broker.libvirtwatch import NAMESPACE, Nic, declared_nics


def domain(metadata: str) -> str:
    return f"<domain><name>vm</name><metadata>{metadata}</metadata><devices/></domain>"


def test_each_nic_element_of_the_namespace_is_one_nic() -> None:
    xml = domain(
        f'<xsk:nic xmlns:xsk="{NAMESPACE}" ifname="eth1" queues="2" start-queue="2" '
        'mode="native" mac="52:54:00:00:00:01" device="virtio-net-pci,bus=pci.1"/>'
        f'<nic xmlns="{NAMESPACE}" ifname="eth2" id="second"/>'
        '<other:nic xmlns:other="urn:someone-else" ifname="eth3"/>'
    )
    assert declared_nics(xml) == [
        Nic(
            Request("eth1", 2, start_queue=2, mode="native"),
            "xsk-eth1",
            "virtio-net-pci,bus=pci.1,mac=52:54:00:00:00:01",
        ),
        Nic(Request("eth2", 1), "second", "virtio-net-pci"),
    ]


def test_no_metadata_no_nics() -> None:
    assert declared_nics("<domain><name>vm</name></domain>") == []


@pytest.mark.parametrize("attrs", ['queues="2"', 'ifname="eth1" queues="two"'])
def test_a_bad_nic_names_what_is_wrong(attrs: str) -> None:
    with pytest.raises(LibvirtError, match="bad or missing attribute"):
        declared_nics(domain(f'<xsk:nic xmlns:xsk="{NAMESPACE}" {attrs}/>'))
