"""Per-uid budgets that keep one hostile caller from crowding out the others."""

from __future__ import annotations

import resource
import time
from collections import Counter
from dataclasses import dataclass, field

from broker.errors import BrokerError, RateLimited, TooManyConnections


@dataclass
class TokenBucket:
    """`rate` messages a second on average, bursts of up to `burst`."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full_at(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


@dataclass
class UidLimits:
    """Connection counts and message rates by uid; idle buckets are forgotten, so the table
    never grows beyond the uids active in the last few seconds."""

    max_connections: int
    max_connections_per_uid: int
    rate_per_uid: float
    burst_per_uid: float
    connections: Counter[int] = field(default_factory=Counter)
    buckets: dict[int, TokenBucket] = field(default_factory=dict)

    def refuse_connection(self, uid: int) -> BrokerError | None:
        """Caps on open connections, overall and per uid, so idle hoarders cannot lock
        everyone else out (see crowding for how a full broker still lets others in)."""
        if self.connections[uid] >= self.max_connections_per_uid:
            return TooManyConnections(
                f"uid {uid} already has {self.max_connections_per_uid} connections open; close some"
            )
        total = self.connections.total()
        if total >= self.max_connections:
            return TooManyConnections(f"the broker holds {total} connections; retry later")
        return None

    def crowding(self, uid: int) -> int | None:
        """The uid that must give up a connection so that uid gets one, or None.

        A full broker makes room for a uid under its cap by taking a connection from the
        uid holding the most, as long as that one would still hold more afterwards: a few
        colluding uids can fill the cap, but not keep a lighter uid out, and the holdings
        settle at fair shares rather than trading places.
        """
        if self.connections.total() < self.max_connections:
            return None
        if self.connections[uid] >= self.max_connections_per_uid:
            return None
        heaviest, held = self.connections.most_common(1)[0]
        return heaviest if held > self.connections[uid] + 1 else None

    def refuse_message(self, uid: int) -> BrokerError | None:
        if self.may_send(uid):
            return None
        return RateLimited(f"uid {uid} sends more than {self.rate_per_uid:g} messages a second")

    def connected(self, uid: int) -> None:
        self.connections[uid] += 1

    def disconnected(self, uid: int) -> None:
        self.connections[uid] -= 1
        if self.connections[uid] <= 0:
            del self.connections[uid]

    def may_send(self, uid: int) -> bool:
        now = time.monotonic()
        bucket = self.buckets.get(uid)
        if bucket is None:
            bucket = self.buckets[uid] = TokenBucket(self.rate_per_uid, self.burst_per_uid)
        allowed = bucket.take(now)
        if len(self.buckets) > 64:
            self.buckets = {u: b for u, b in self.buckets.items() if not b.full_at(now)}
        return allowed


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one: each connection costs two fds (socket,
    pidfd), and 1024 would let a few hundred idle clients starve everyone else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
