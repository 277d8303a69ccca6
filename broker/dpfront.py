"""The AF_XDP device-plugin protocol, which DPDK's af_xdp PMD speaks with use_cni=1: the
second front end on the core (frontend.py), one listening socket per map lease.

DPDK 24.11 (drivers/net/af_xdp/rte_eth_af_xdp.c, uds_get_xskmap_fd) opens one connection
per queue it sets up and sends text commands without a terminating NUL; each reply is read
into 128 bytes and compared by prefix:
    /connect,HOSTNAME -> /host_ok   /version -> 0.1   /xsk_map_fd,IFNAME -> /fd_ack + map fd
    /fin -> /fin_ack                anything else -> /nak
The hostname is ignored: who asks is the kernel's word (SO_PEERCRED at accept), and only the
lease's consumer uid is answered. /config_busy_poll (CNDP's, not sent by DPDK 24.11) is
refused: the busy-poll settings that need privilege are not offered (it comes with an fd,
so where the kernel has SO_PASSRIGHTS its sendmsg already fails with EPERM: fdguard.py).
"""

from __future__ import annotations

import logging
import os

from broker.audit import log_event
from broker.core import Service
from broker.errors import BrokerError
from broker.frontend import Answer, Waiting
from broker.policy import Caller

log = logging.getLogger("xsk-broker")

MAX_COMMAND_BYTES = 64  # DPDK's UDS_MAX_CMD_LEN
VERSION = b"0.1"


class DevicePluginFrontEnd:
    """The device-plugin protocol for one map lease (by id: once it ends, all is refused)."""

    def __init__(self, service: Service, lease_id: str) -> None:
        self.service = service
        self.lease_id = lease_id

    def refuse(self, error: BrokerError) -> Answer:
        return Answer(b"/nak")

    def handle(self, caller: Caller, data: bytes) -> Answer | Waiting:
        command, _, argument = data[:MAX_COMMAND_BYTES].rstrip(b"\0").partition(b",")
        lease = self.service.leases.by_id.get(self.lease_id)
        refusal = {b"/connect": b"/host_nak", b"/xsk_map_fd": b"/fd_nak"}.get(command, b"/nak")
        if lease is None:
            return Answer(refusal)
        if caller.uid != lease.info.consumer_uid:
            log_event(
                log,
                f"denied device-plugin {command.decode(errors='replace')} on lease "
                f"{self.lease_id} to uid {caller.uid} (pid {caller.pid}): the lease is for "
                f"uid {lease.info.consumer_uid}",
                event="denied",
                lease=self.lease_id,
                interface=lease.info.ifname,
                uid=caller.uid,
                pid=caller.pid,
                reason="not the lease's consumer uid",
            )
            return Answer(refusal)
        if command == b"/connect":
            return Answer(b"/host_ok")
        if command == b"/version":
            return Answer(VERSION)
        if command == b"/fin":
            return Answer(b"/fin_ack")
        if command != b"/xsk_map_fd" or argument.decode(errors="replace") != lease.info.ifname:
            return Answer(refusal)
        map_fd = self.service.maps.map_fd(self.lease_id) if self.service.maps else None
        if map_fd is None:
            return Answer(refusal)
        log.info("lease %s: its XSKMAP to pid %d", self.lease_id, caller.pid)
        return Answer(b"/fd_ack", [os.dup(map_fd)])
