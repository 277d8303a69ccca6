"""The seam between the event loop and a wire protocol.

A front end turns its wire's bytes into the core's typed messages, and the core's results
or errors into its wire's replies. The server (server.py) moves bytes, fds and events and
never looks inside; the core (core.py) never sees bytes. Protocol v1 is jsonfront.py; a
second wire protocol, such as the device-plugin protocol DPDK speaks, is a second class
with these two methods on the same core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.core import NeedsPolkit
from broker.errors import BrokerError
from broker.policy import Caller


@dataclass(frozen=True)
class Answer:
    """What goes back on a connection; lease_id names the lease whose fds these are."""

    data: bytes
    fds: Sequence[int] = ()
    lease_id: str | None = None


@dataclass(frozen=True)
class Waiting:
    """The answer waits for polkit: ask it for check.action, then finish(verdict), where
    verdict is None for yes or the error that says no."""

    check: NeedsPolkit
    finish: Callable[[BaseException | None], Answer]


class FrontEnd(Protocol):
    def handle(self, caller: Caller, data: bytes) -> Answer | Waiting:
        """The answer to one message from caller, or what it waits for."""
        ...

    def refuse(self, error: BrokerError) -> Answer:
        """A refusal before any message is read (connection cap, rate, a bad datagram)."""
        ...
