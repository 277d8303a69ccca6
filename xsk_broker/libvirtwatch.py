"""`xsk-broker libvirt-watch`: AF_XDP NICs for the libvirt domains that declare them.

A domain declares its NICs in its own XML, so they follow it through define, start,
restart and migration of its definition:

    <metadata>
      <xsk:nic xmlns:xsk="urn:xsk-broker:libvirt:1" ifname="eth1" queues="2"
               mac="52:54:00:12:34:56" device="virtio-net-pci,bus=pci.1"/>
    </metadata>

(optional: id, the netdev id, default xsk-IFNAME; device, default virtio-net-pci; mode;
start-queue). The watcher follows libvirt's domain lifecycle events and hot-plugs them
(client.libvirt) each time the domain's QEMU starts; the lease ends by itself when that
QEMU exits. libvirt forbids calling its API from a hook script, hence a daemon. At start it
reconciles: every running domain gets the NICs it declares and lacks (a lease tagged with
the netdev id whose consumer is its QEMU), so domains started while it was down get theirs.

libvirt delivers events on its event-loop thread, which must not call back into libvirt;
the callback only queues the domain and the main thread does the work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt

from broker.errors import BrokerError
from broker.protocol import Request
from client import qmp
from client.libvirt import LibvirtError, LibvirtMonitor, connect, default_id, qemu_pid
from client.sync import Client

NAMESPACE = "urn:xsk-broker:libvirt:1"
_STOP = ""  # queued when the libvirt connection closes


@dataclass(frozen=True)
class Nic:
    """One <xsk:nic/> of a domain's metadata."""

    request: Request
    netdev_id: str
    device: str

    @classmethod
    def from_element(cls, element: ET.Element) -> Nic:
        """From the element's attributes; LibvirtError naming the attribute if one is bad."""
        attrs = element.attrib
        try:
            ifname = attrs["ifname"]
            request = Request(
                ifname=ifname,
                queues=int(attrs.get("queues", "1")),
                start_queue=int(attrs.get("start-queue", "0")),
                mode=attrs.get("mode", Request.mode),
            )
        except (KeyError, ValueError) as exc:
            raise LibvirtError(f"<xsk:nic {attrs}>: bad or missing attribute: {exc}") from None
        device = attrs.get("device", qmp.DEFAULT_DEVICE)
        if "mac" in attrs:
            device = f"{device},mac={attrs['mac']}"
        return cls(request, attrs.get("id", default_id(ifname)), device)


def declared_nics(domain_xml: str) -> list[Nic]:
    """The NICs a domain's XML declares in its <metadata>."""
    metadata = ET.fromstring(domain_xml).find("metadata")
    if metadata is None:
        return []
    return [Nic.from_element(e) for e in metadata.iter(f"{{{NAMESPACE}}}nic")]


class Watcher:
    """Reconciles one libvirt connection's running domains with their declared NICs."""

    def __init__(self, conn: Any, socket_path: str | None) -> None:
        self.conn = conn
        self.socket_path = socket_path
        self.pending: queue.Queue[str] = queue.Queue()

    def reconcile_all(self) -> None:
        for domain in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            self.reconcile(domain)

    def reconcile(self, domain: Any) -> None:
        """Hot-plug each declared NIC that has no lease for this QEMU yet; report each."""
        name = domain.name()
        try:
            nics = declared_nics(domain.XMLDesc(0))
            if not nics:
                return
            monitor = LibvirtMonitor(domain, qemu_pid(domain))
            held = {
                lease.tag
                for lease in Client(self.socket_path).status().leases
                if lease.consumer_pid == monitor.pid
            }
        except (BrokerError, libvirt.libvirtError) as exc:
            _log(f"{name}: {_text(exc)}")
            return
        for nic in nics:
            if nic.netdev_id in held:
                continue
            try:
                result = asyncio.run(
                    qmp.attach(
                        monitor,
                        dataclasses.replace(nic.request, tag=nic.netdev_id),
                        nic.netdev_id,
                        device=nic.device,
                        socket_path=self.socket_path,
                    )
                )
            except BrokerError as exc:
                _log(f"{name}: {nic.netdev_id}: {_text(exc)}")
                continue
            lease = result.lease
            _log(
                f"{name}: attached {nic.netdev_id} ({lease.ifname} queues {lease.queue_ids}, "
                f"{lease.mode}) to QEMU pid {monitor.pid}, lease {lease.lease_id}"
            )

    def on_lifecycle(self, _conn: Any, domain: Any, event: int, _detail: int, _opaque: Any) -> None:
        """libvirt's event thread: queue started domains, nothing else."""
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            self.pending.put(domain.UUIDString())

    def on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        _log(f"libvirt closed the connection (reason {reason})")
        self.pending.put(_STOP)

    def run(self) -> int:
        """Reconcile, then follow start events until libvirt goes away (exit 1, so that
        systemd restarts the watcher and it reconciles again)."""
        self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.on_lifecycle, None
        )
        self.conn.registerCloseCallback(self.on_close, None)
        # A libvirtd that hangs instead of closing is noticed too (5 s, 3 missed replies).
        self.conn.setKeepAlive(5, 3)
        self.reconcile_all()
        _log("watching libvirt domain events")
        while (uuid := self.pending.get()) != _STOP:
            try:
                domain = self.conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                _log(f"{uuid}: {_text(exc)}")
                continue
            self.reconcile(domain)
        return 1


def _text(exc: BaseException) -> str:
    if isinstance(exc, BrokerError):
        return f"{exc.code}: {exc.message}"
    return str(exc)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def main(uri: str | None, socket_path: str | None, once: bool) -> int:
    """The watcher, or with once a single reconcile (exit 0 whatever each NIC did)."""
    if not once:
        libvirt.virEventRegisterDefaultImpl()  # before the connection opens
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
    watcher = Watcher(connect(uri), socket_path)
    if once:
        watcher.reconcile_all()
        return 0
    return watcher.run()
