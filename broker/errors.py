"""Every error the broker or its clients raise, with a stable wire code, an errno and a sentence.

Part of the wire contract (stdlib only, imported by client/). The hierarchy says what a
caller can do about an error:

- BadInput: the message or a name in it is wrong; fix the request.
- Refused: understood and said no (policy, a busy queue, a memory budget); retrying the
  same request will not help until something else changes.
- Transient: a limit of the moment (rate, connection cap, polkit queue); retry later.
- Failed: the broker tried and the kernel or the broker itself failed.
- LocalError: raised on the client side, never sent: the broker cannot be reached, broke
  the protocol, did not answer, or the command line is wrong.

The wire code of each class never changes; the registry maps it back to the class (a code
this version does not know comes back as a BrokerError that keeps it).
"""

from __future__ import annotations

import errno as errno_mod
from typing import Any, ClassVar

Details = dict[str, Any]


def printable(text: str) -> str:
    """text with every character that is not printable (newlines, ESC, NUL, bidi controls,
    lone surrogates, ...) written as its Python escape (\\n, \\x1b, \\u202e, \\ud800).

    The one escaping function for text that may carry client input: applied to every error
    message (so replies and the lines that log them stay one line, and a terminal shows what
    was sent rather than obeying it) and to every log record (broker/audit.py).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class BrokerError(Exception):
    """An error with a stable code for programs, an errno, and a sentence for people."""

    code: str = "INTERNAL"
    default_errno: ClassVar[int] = errno_mod.EIO
    registry: ClassVar[dict[str, type[BrokerError]]] = {}

    def __init__(
        self, message: str, *, errno: int | None = None, details: Details | None = None
    ) -> None:
        self.message = printable(message)
        super().__init__(self.message)
        self.errno = self.default_errno if errno is None else errno
        self.details: Details = details or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            BrokerError.registry[cls.code] = cls

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> Details:
        body: Details = {"code": self.code, "errno": self.errno, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    @staticmethod
    def from_wire(body: Details) -> BrokerError:
        """The typed error for a wire body; an unknown code keeps its text on a BrokerError."""
        code = str(body.get("code", "INTERNAL"))
        cls = BrokerError.registry.get(code, BrokerError)
        raw_errno = body.get("errno")
        details = body.get("details")
        error = cls(
            str(body.get("message", "")),
            errno=raw_errno if isinstance(raw_errno, int) else None,
            details=details if isinstance(details, dict) else None,
        )
        error.code = code
        return error


BrokerError.registry["INTERNAL"] = BrokerError


class BadInput(BrokerError):
    """The message, or a name in it, is wrong: fix the request."""


class Refused(BrokerError):
    """Understood, and refused by policy or by the state of things."""


class Transient(BrokerError):
    """A limit of the moment: the same request may succeed later."""


class Failed(BrokerError):
    """The broker tried; the kernel refused or the broker itself failed."""


class LocalError(BrokerError):
    """Raised on the client side; never sent by the broker."""


class BadMessage(BadInput):
    """Not one UTF-8 JSON object."""

    code = "BAD_MESSAGE"
    default_errno = errno_mod.EBADMSG


class BadVersion(BadInput):
    """Unsupported protocol version."""

    code = "BAD_VERSION"
    default_errno = errno_mod.EPROTO


class UnknownOp(BadInput):
    """The op is not known."""

    code = "UNKNOWN_OP"
    default_errno = errno_mod.EOPNOTSUPP


class BadRequest(BadInput):
    """A field is missing or wrong."""

    code = "BAD_REQUEST"
    default_errno = errno_mod.EINVAL


class MessageTooLarge(BadInput):
    """Message over the size limit."""

    code = "MESSAGE_TOO_LARGE"
    default_errno = errno_mod.EMSGSIZE


class FdsRefused(BadInput):
    """Clients may not send fds."""

    code = "FDS_REFUSED"
    default_errno = errno_mod.EPROTO


class NoSuchDevice(BadInput):
    """Unknown interface."""

    code = "NO_SUCH_DEVICE"
    default_errno = errno_mod.ENODEV


class BadQueues(BadInput):
    """Queues outside the device."""

    code = "BAD_QUEUES"
    default_errno = errno_mod.ERANGE


class ModeUnsupported(BadInput):
    """XDP mode not possible."""

    code = "MODE_UNSUPPORTED"
    default_errno = errno_mod.EOPNOTSUPP


class NoSuchLease(BadInput):
    """Unknown lease id."""

    code = "NO_SUCH_LEASE"
    default_errno = errno_mod.ENOENT


class ConsumerGone(BadInput):
    """Consumer process gone."""

    code = "CONSUMER_GONE"
    default_errno = errno_mod.ESRCH


class Denied(Refused):
    """Policy does not allow it."""

    code = "DENIED"
    default_errno = errno_mod.EACCES


class QueueBusy(Refused):
    """Queue leased or slot occupied."""

    code = "QUEUE_BUSY"
    default_errno = errno_mod.EBUSY


class XdpConflict(Refused):
    """Another XDP program holds the interface."""

    code = "XDP_CONFLICT"
    default_errno = errno_mod.EBUSY


class InterfaceTaken(Refused):
    """Exclusive tenancy: another uid's consumer holds a lease on the interface."""

    code = "INTERFACE_TAKEN"
    default_errno = errno_mod.EBUSY


class MemlockExceeded(Refused):
    """Consumer cannot lock enough memory."""

    code = "MEMLOCK"
    default_errno = errno_mod.ENOBUFS


class LeasesLive(Refused):
    """Leases still hold it."""

    code = "LEASES_LIVE"
    default_errno = errno_mod.EBUSY


class RateLimited(Transient):
    """Too many requests."""

    code = "RATE_LIMITED"
    default_errno = errno_mod.EAGAIN


class TooManyConnections(Transient):
    """Connection cap reached."""

    code = "TOO_MANY_CONNECTIONS"
    default_errno = errno_mod.EAGAIN


class AttachFailed(Failed):
    """The kernel refused."""

    code = "ATTACH_FAILED"
    default_errno = errno_mod.EIO


class Timeout(LocalError):
    """No complete message in time."""

    code = "TIMEOUT"
    default_errno = errno_mod.ETIMEDOUT


class BrokerUnreachable(LocalError):
    """Cannot reach the broker."""

    code = "BROKER_UNREACHABLE"
    default_errno = errno_mod.ECONNREFUSED


class ProtocolViolation(LocalError):
    """The peer broke the protocol."""

    code = "PROTOCOL"
    default_errno = errno_mod.EPROTO


class UntrustedBroker(LocalError):
    """The process listening on the socket is not the broker: it runs as another uid."""

    code = "UNTRUSTED_BROKER"
    default_errno = errno_mod.EPERM


class UsageError(LocalError):
    """The command line itself is wrong; exit status 2 like argparse's own errors."""

    code = "USAGE"
    default_errno = errno_mod.EINVAL
