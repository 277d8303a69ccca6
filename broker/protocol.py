"""Wire messages shared by the broker and its clients.

Kept free of heavy imports (no libbpf, no pyroute2) so that client/ can use it in an
unprivileged process. One message is one SOCK_SEQPACKET datagram holding one UTF-8 JSON
object; the exact rules are in docs/protocol.md.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 65536
# The kernel refuses more than SCM_MAX_FD (253) descriptors in one message.
MAX_QUEUES_PER_LEASE = 253
DEFAULT_SOCKET_PATH = "/run/xsk-broker/broker.sock"
SOCKET_ENV = "XSK_BROKER_SOCKET"
# QEMU: (2048 fill + 2048 completion) * 2 * 4096-byte frames per queue.
QEMU_UMEM_BYTES = 32 * 1024 * 1024
MODES = ("auto", "native", "skb")
MAX_TAG_CHARS = 64
IFNAMSIZ = 16
PID_MAX_LIMIT = 4194304  # the kernel's PID_MAX_LIMIT on 64-bit
LEASE_ID_CHARS = 12


def socket_path_from(path: str | os.PathLike | None) -> str:
    """An explicit path, else $XSK_BROKER_SOCKET, else the system broker's path."""
    return os.fspath(path) if path else os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


class BrokerError(Exception):
    """An error with a stable code for programs, an errno, and a sentence for people."""

    code: ClassVar[str] = "INTERNAL"
    default_errno: ClassVar[int] = errno_mod.EIO
    registry: ClassVar[dict[str, type[BrokerError]]] = {}

    def __init__(
        self, message: str, *, errno: int | None = None, details: dict | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errno = self.default_errno if errno is None else errno
        self.details = details or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        BrokerError.registry[cls.code] = cls

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> dict:
        body = {"code": self.code, "errno": self.errno, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    @staticmethod
    def from_wire(body: dict) -> BrokerError:
        cls = BrokerError.registry.get(body.get("code", ""), BrokerError)
        err = cls(
            str(body.get("message", "")), errno=body.get("errno"), details=body.get("details")
        )
        if cls is BrokerError:
            err.code = str(body.get("code", "INTERNAL"))
        return err


BrokerError.registry["INTERNAL"] = BrokerError


def _error(name: str, code: str, err: int, doc: str) -> type[BrokerError]:
    return type(name, (BrokerError,), {"code": code, "default_errno": err, "__doc__": doc})


BadMessage = _error("BadMessage", "BAD_MESSAGE", errno_mod.EBADMSG, "Not one UTF-8 JSON object.")
BadVersion = _error("BadVersion", "BAD_VERSION", errno_mod.EPROTO, "Unsupported protocol version.")
UnknownOp = _error("UnknownOp", "UNKNOWN_OP", errno_mod.EOPNOTSUPP, "The op is not known.")
BadRequest = _error("BadRequest", "BAD_REQUEST", errno_mod.EINVAL, "A field is missing or wrong.")
MessageTooLarge = _error(
    "MessageTooLarge", "MESSAGE_TOO_LARGE", errno_mod.EMSGSIZE, "Message over the size limit."
)
FdsRefused = _error("FdsRefused", "FDS_REFUSED", errno_mod.EPROTO, "Clients may not send fds.")
NoSuchDevice = _error("NoSuchDevice", "NO_SUCH_DEVICE", errno_mod.ENODEV, "Unknown interface.")
BadQueues = _error("BadQueues", "BAD_QUEUES", errno_mod.ERANGE, "Queues outside the device.")
ModeUnsupported = _error(
    "ModeUnsupported", "MODE_UNSUPPORTED", errno_mod.EOPNOTSUPP, "XDP mode not possible."
)
QueueBusy = _error("QueueBusy", "QUEUE_BUSY", errno_mod.EBUSY, "Queue leased or slot occupied.")
XdpConflict = _error(
    "XdpConflict", "XDP_CONFLICT", errno_mod.EBUSY, "Another XDP program holds the interface."
)
AttachFailed = _error("AttachFailed", "ATTACH_FAILED", errno_mod.EIO, "The kernel refused.")
Denied = _error("Denied", "DENIED", errno_mod.EACCES, "Policy does not allow it.")
MemlockExceeded = _error(
    "MemlockExceeded", "MEMLOCK", errno_mod.ENOBUFS, "Consumer cannot lock enough memory."
)
NoSuchLease = _error("NoSuchLease", "NO_SUCH_LEASE", errno_mod.ENOENT, "Unknown lease id.")
ConsumerGone = _error("ConsumerGone", "CONSUMER_GONE", errno_mod.ESRCH, "Consumer process gone.")
LeasesLive = _error("LeasesLive", "LEASES_LIVE", errno_mod.EBUSY, "Leases still hold it.")
RateLimited = _error("RateLimited", "RATE_LIMITED", errno_mod.EAGAIN, "Too many requests.")
TooManyConnections = _error(
    "TooManyConnections", "TOO_MANY_CONNECTIONS", errno_mod.EAGAIN, "Connection cap reached."
)
Timeout = _error("Timeout", "TIMEOUT", errno_mod.ETIMEDOUT, "No complete message in time.")
BrokerUnreachable = _error(
    "BrokerUnreachable", "BROKER_UNREACHABLE", errno_mod.ECONNREFUSED, "Cannot reach the broker."
)
ProtocolViolation = _error(
    "ProtocolViolation", "PROTOCOL", errno_mod.EPROTO, "The peer broke the protocol."
)


def _field(body: dict, name: str, kind: type, default: Any = ..., *, nullable: bool = False):
    """Return body[name] checked against kind; bool is never accepted as int."""
    if name not in body:
        if default is ...:
            raise BadRequest(f"field '{name}' is required")
        return default
    value = body[name]
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def validate_ifname(ifname: str) -> str:
    """Apply the kernel's dev_valid_name() rules, so nothing odd reaches a QEMU argument."""
    if not ifname or len(ifname.encode()) >= IFNAMSIZ or ifname in (".", ".."):
        raise BadRequest(f"ifname {ifname!r} is not a valid interface name (1-15 bytes)")
    if any(c in "/:" or c.isspace() or not c.isprintable() or 0xD800 <= ord(c) < 0xE000
           for c in ifname):  # fmt: skip
        raise BadRequest(f"ifname {ifname!r} contains '/', ':', white space or control characters")
    return ifname


def validate_lease_id(lease_id: str) -> str:
    """Lease ids are 12 hex digits; anything else is refused before it is echoed or logged."""
    if len(lease_id) != LEASE_ID_CHARS or any(c not in "0123456789abcdef" for c in lease_id):
        raise BadRequest(f"lease_id must be {LEASE_ID_CHARS} lower-case hex digits")
    return lease_id


@dataclass(frozen=True)
class Request:
    """Ask for one AF_XDP socket per queue in [start_queue, start_queue + queues)."""

    op: ClassVar[str] = "request"
    ifname: str
    queues: int
    start_queue: int = 0
    mode: str = "auto"
    tag: str | None = None
    consumer_pid: int | None = None
    umem_bytes: int = QEMU_UMEM_BYTES

    @classmethod
    def from_body(cls, body: dict) -> Request:
        ifname = validate_ifname(_field(body, "ifname", str))
        queues = _field(body, "queues", int)
        if not 1 <= queues <= MAX_QUEUES_PER_LEASE:
            raise BadQueues(f"queues must be 1..{MAX_QUEUES_PER_LEASE}, got {queues}")
        start = _field(body, "start_queue", int, 0)
        if start < 0:
            raise BadQueues(f"start_queue must be 0 or more, got {start}")
        mode = _field(body, "mode", str, "auto")
        if mode not in MODES:
            raise ModeUnsupported(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        tag = _field(body, "tag", str, None, nullable=True)
        if tag is not None and (len(tag) > MAX_TAG_CHARS or not tag.isprintable()):
            raise BadRequest(f"tag must be at most {MAX_TAG_CHARS} printable characters")
        pid = _field(body, "consumer_pid", int, None, nullable=True)
        if pid is not None and not 0 < pid <= PID_MAX_LIMIT:
            raise BadRequest(f"consumer_pid must be 1..{PID_MAX_LIMIT}, got {pid}")
        umem = _field(body, "umem_bytes", int, QEMU_UMEM_BYTES)
        if not 4096 <= umem <= 1 << 40:
            raise BadRequest(f"umem_bytes must be 4096..2^40, got {umem}")
        return cls(ifname, queues, start, mode, tag, pid, umem)


@dataclass(frozen=True)
class StatusQuery:
    """Ask for attachments and leases."""

    op: ClassVar[str] = "status"

    @classmethod
    def from_body(cls, body: dict) -> StatusQuery:
        return cls()


@dataclass(frozen=True)
class Ping:
    """Liveness check; the reply carries the broker's version."""

    op: ClassVar[str] = "ping"

    @classmethod
    def from_body(cls, body: dict) -> Ping:
        return cls()


@dataclass(frozen=True)
class _LeaseOp:
    """An op on one lease, named by its id."""

    op: ClassVar[str]
    lease_id: str

    @classmethod
    def from_body(cls, body: dict) -> _LeaseOp:
        return cls(validate_lease_id(_field(body, "lease_id", str)))


@dataclass(frozen=True)
class Release(_LeaseOp):
    """End one of the caller's own leases now; its slots are emptied (the sockets the
    consumer holds stay open but receive nothing more)."""

    op: ClassVar[str] = "release"


@dataclass(frozen=True)
class Revoke(_LeaseOp):
    """Admin: end someone's lease now and empty its slots (traffic back to the stack)."""

    op: ClassVar[str] = "revoke"


@dataclass(frozen=True)
class Detach:
    """Remove the program and its pins from an interface (admin only)."""

    op: ClassVar[str] = "detach"
    ifname: str
    force: bool = False

    @classmethod
    def from_body(cls, body: dict) -> Detach:
        return cls(validate_ifname(_field(body, "ifname", str)), _field(body, "force", bool, False))


Message = Request | StatusQuery | Ping | Release | Revoke | Detach
OPS: dict[str, type] = {m.op: m for m in (Request, StatusQuery, Ping, Release, Revoke, Detach)}
_ENVELOPE = {"version", "op"}


def decode_message(data: bytes) -> Message:
    """Turn one datagram into a typed message, or raise the BrokerError that says why not."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"message is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadMessage(f"message is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise BadMessage("message nests JSON too deeply") from None
    if not isinstance(body, dict):
        raise BadMessage(f"message must be a JSON object, got {type(body).__name__}")
    version = body.get("version")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise BadVersion(f"protocol version {version!r} is not supported; use {PROTOCOL_VERSION}")
    op = body.get("op")
    kind = OPS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise UnknownOp(f"op {op!r} is not known; known ops: {', '.join(sorted(OPS))}")
    known = _ENVELOPE | {f for f in kind.__dataclass_fields__ if f != "op"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field(s) for op '{op}': {', '.join(unknown)}")
    try:
        return kind.from_body(body)
    except (UnicodeError, ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"a field of op '{op}' cannot be used: {exc}") from None


def encode_message(message: Message) -> bytes:
    """The datagram a client sends for message (None fields are left out)."""
    body = {"version": PROTOCOL_VERSION, "op": message.op}
    body.update({k: v for k, v in asdict(message).items() if v is not None})
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class LeaseInfo:
    """What the broker tells a client about a lease; the fds travel beside it."""

    lease_id: str
    ifname: str
    ifindex: int
    queue_ids: list[int]
    mode: str
    uid: int = -1
    pid: int = 0
    consumer_pid: int = 0
    tag: str | None = None
    umem_bytes: int = QEMU_UMEM_BYTES
    created: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def start_queue(self) -> int:
        return self.queue_ids[0]

    def to_wire(self) -> dict:
        """The lease as JSON-ready fields (dataclasses.asdict's deep copy costs ~80 us)."""
        return {
            name: list(value) if isinstance(value, list) else value
            for name, value in vars(self).items()
        } | {"extra": dict(self.extra)}

    @classmethod
    def from_wire(cls, body: dict) -> LeaseInfo:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in body.items() if k in names})


def encode_reply(op: str, payload: dict) -> bytes:
    return json.dumps(
        {"version": PROTOCOL_VERSION, "ok": True, "op": op, **payload}, separators=(",", ":")
    ).encode()


def encode_error(error: BrokerError) -> bytes:
    return json.dumps(
        {"version": PROTOCOL_VERSION, "ok": False, "error": error.to_wire()},
        separators=(",", ":"),
    ).encode()


def decode_reply(data: bytes) -> dict:
    """The payload of a success reply; a failure reply is raised as its typed BrokerError."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolViolation(f"broker reply is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("version") != PROTOCOL_VERSION:
        raise ProtocolViolation(f"broker reply has the wrong shape or version: {body!r:.200}")
    if not body.get("ok"):
        error = body.get("error")
        if not isinstance(error, dict):
            raise ProtocolViolation("broker reported a failure without an error object")
        raise BrokerError.from_wire(error)
    return body


def _qemu_escape(value: str) -> str:
    """QEMU's option syntax escapes ',' by doubling it."""
    return value.replace(",", ",,")


def _netdev(netdev_id: str, lease: LeaseInfo, sock_fds: str) -> str:
    return (
        f"af-xdp,id={_qemu_escape(netdev_id)},ifname={_qemu_escape(lease.ifname)},"
        f"mode={lease.mode},queues={len(lease.queue_ids)},start-queue={lease.start_queue},"
        f"inhibit=on,sock-fds={sock_fds}"
    )


def netdev_arg(netdev_id: str, lease: LeaseInfo, sock_fds: list[int] | list[str]) -> str:
    """The whole `-netdev` value QEMU needs for these sockets (numbers or getfd names)."""
    if len(sock_fds) != len(lease.queue_ids):
        raise ValueError(f"{len(lease.queue_ids)} queues need as many fds, got {len(sock_fds)}")
    return _netdev(netdev_id, lease, ":".join(str(fd) for fd in sock_fds))


def netdev_template(lease: LeaseInfo) -> str:
    """The `-netdev` value with `{id}` and `{sock-fds}` left for the receiver to fill in:
    fd numbers are chosen by the receiving process's kernel, not by the broker."""
    return _netdev("{id}", lease, "{sock-fds}")


def netdev_qmp(netdev_id: str, lease: LeaseInfo, fd_names: list[str]) -> dict:
    """The `netdev_add` arguments for these sockets registered over QMP under fd_names."""
    if len(fd_names) != len(lease.queue_ids):
        raise ValueError(f"{len(lease.queue_ids)} queues need as many fd names")
    return {
        "type": "af-xdp",
        "id": netdev_id,
        "ifname": lease.ifname,
        "mode": lease.mode,
        "queues": len(lease.queue_ids),
        "start-queue": lease.start_queue,
        "inhibit": True,
        "sock-fds": ":".join(fd_names),
    }
