"""What netlink says about an interface: rx queue count and XDP attachment state.

pyroute2 costs ~200 ms to import, so it is imported on first use only: a broker that adopts
pinned attachments answers its first request without it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from broker.errors import NoSuchDevice

# IFLA_XDP_ATTACHED values (include/uapi/linux/if_link.h)
_ATTACH_MODES = {0: None, 1: "native", 2: "skb", 3: "hw", 4: "multi"}


@dataclass(frozen=True)
class LinkState:
    """The part of an interface's netlink description the loader needs."""

    ifindex: int
    ifname: str
    rx_queues: int
    xdp_mode: str | None
    xdp_prog_id: int


def ifindex_of(ifname: str) -> int:
    """Resolve in the broker's own network namespace, where QEMU must run too."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise NoSuchDevice(
            f"interface {ifname!r} does not exist in the broker's network namespace"
        ) from None


def link_state(ifindex: int) -> LinkState:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            (link,) = ipr.get_links(ifindex)
        except NetlinkError as exc:
            raise NoSuchDevice(f"interface with ifindex {ifindex} is gone: {exc}") from None
    xdp = link.get_attr("IFLA_XDP")
    mode, prog_id = None, 0
    if xdp is not None:
        mode = _ATTACH_MODES.get(xdp.get_attr("IFLA_XDP_ATTACHED") or 0, "unknown")
        prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    return LinkState(
        ifindex=ifindex,
        ifname=link.get_attr("IFLA_IFNAME"),
        rx_queues=link.get_attr("IFLA_NUM_RX_QUEUES") or 1,
        xdp_mode=mode,
        xdp_prog_id=prog_id,
    )
