"""Wire messages and replies shared by the broker and its clients, and their JSON codec.

Part of the wire contract with errors.py and fdpass.py: stdlib only, so client/ can use it
in an unprivileged process. One message is one SOCK_SEQPACKET datagram holding one UTF-8
JSON object; the exact rules are in docs/protocol.md. Request's fields are the one
description of what a caller may ask for: the clients, QMP hot-plug and the CLI flags are
all made from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from broker.errors import (
    BadMessage,
    BadQueues,
    BadRequest,
    BadVersion,
    BrokerError,
    MessageTooLarge,
    ModeUnsupported,
    ProtocolViolation,
    UnknownOp,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 65536
# The kernel refuses more than SCM_MAX_FD (253) descriptors in one message.
MAX_QUEUES_PER_LEASE = 253
DEFAULT_SOCKET_PATH = "/run/xsk-broker/broker.sock"
SOCKET_ENV = "XSK_BROKER_SOCKET"
# QEMU: (2048 fill + 2048 completion) * 2 * 4096-byte frames per queue.
QEMU_UMEM_BYTES = 32 * 1024 * 1024
MIN_UMEM_BYTES, MAX_UMEM_BYTES = 4096, 1 << 40
MODES = ("auto", "native", "skb")
# What a lease hands over: one unbound socket per queue (QEMU sock-fds), or access to an
# XSKMAP for consumers that make their own sockets (DPDK use_cni / use_pinned_map, QEMU
# map-path): a device-plugin socket and a bpffs pin only the consumer's uid may use.
HANDOUTS = ("sockets", "map")
MAX_TAG_CHARS = 64
IFNAMSIZ = 16
PID_MAX_LIMIT = 4194304  # the kernel's PID_MAX_LIMIT on 64-bit
QUEUE_ID_LIMIT = 1 << 32  # the kernel's queue ids (and XSKMAP keys) are u32
LEASE_ID_CHARS = 12
# How much of a refused message's unknown field names an error repeats back (and logs).
MAX_NAMES_ECHOED = 8
MAX_NAME_ECHO = 64
MAX_ERROR_CHARS = 4096


Body = dict[str, Any]


def _field(body: Body, name: str, kind: type, default: Any = ..., *, nullable: bool = False) -> Any:
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


def _shown(number: int) -> str:
    """A number as an error repeats it: in full up to 20 digits, else its first 20 and its
    length (the parser takes 4300 digits, and a refusal is logged)."""
    text = str(number)
    return text if len(text) <= 20 else f"{text[:20]}... ({len(text)} digits)"


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


def param(help: str, *, flag: bool = True, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    """Field metadata: what the CLI shows for it, and whether it is a CLI flag at all."""
    return {"help": help, "flag": flag, "choices": choices}


@dataclass(frozen=True)
class Request:
    """Ask for one AF_XDP socket per queue in [start_queue, start_queue + queues)."""

    op: ClassVar[str] = "request"
    ifname: str = field(metadata=param("interface to take queues of"))
    queues: int = field(metadata=param("number of queues"))
    start_queue: int = field(default=0, metadata=param("first queue (default 0)"))
    mode: str = field(default="auto", metadata=param("XDP attach mode wish", choices=MODES))
    tag: str | None = field(
        default=None, metadata=param("free text shown in status and audit (e.g. the VM name)")
    )
    consumer_pid: int | None = field(
        default=None,
        metadata=param("the process the sockets are for (default the caller)", flag=False),
    )
    umem_bytes: int = field(
        default=QEMU_UMEM_BYTES,
        metadata=param(
            "UMEM the consumer will register per queue "
            "(default QEMU's 32 MiB; checked against its locked-memory limit)"
        ),
    )
    handout: str | None = field(
        default=None,
        metadata=param(
            "sockets (QEMU sock-fds) or map (DPDK use_cni/use_pinned_map, QEMU map-path; "
            "takes every queue of the interface)",
            choices=HANDOUTS,
        ),
    )

    @property
    def queue_ids(self) -> range:
        return range(self.start_queue, self.start_queue + self.queues)

    @property
    def wants_map(self) -> bool:
        """A map lease (None, the default, is "sockets": left out on the wire for v1)."""
        return self.handout == "map"

    @classmethod
    def from_body(cls, body: Body) -> Request:
        ifname = validate_ifname(_field(body, "ifname", str))
        queues = _field(body, "queues", int)
        if not 1 <= queues <= MAX_QUEUES_PER_LEASE:
            raise BadQueues(f"queues must be 1..{MAX_QUEUES_PER_LEASE}, got {_shown(queues)}")
        start = _field(body, "start_queue", int, 0)
        if not 0 <= start <= QUEUE_ID_LIMIT - queues:
            raise BadQueues(
                f"start_queue must be 0..2^32-{queues} (queue ids are u32), got {_shown(start)}"
            )
        mode = _field(body, "mode", str, "auto")
        if mode not in MODES:
            raise ModeUnsupported(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        tag = _field(body, "tag", str, None, nullable=True)
        if tag is not None and (len(tag) > MAX_TAG_CHARS or not tag.isprintable()):
            raise BadRequest(f"tag must be at most {MAX_TAG_CHARS} printable characters")
        pid = _field(body, "consumer_pid", int, None, nullable=True)
        if pid is not None and not 0 < pid <= PID_MAX_LIMIT:
            raise BadRequest(f"consumer_pid must be 1..{PID_MAX_LIMIT}, got {_shown(pid)}")
        umem = _field(body, "umem_bytes", int, QEMU_UMEM_BYTES)
        if not MIN_UMEM_BYTES <= umem <= MAX_UMEM_BYTES:
            raise BadRequest(f"umem_bytes must be {MIN_UMEM_BYTES}..2^40, got {_shown(umem)}")
        handout = _field(body, "handout", str, None, nullable=True)
        if handout is not None and handout not in HANDOUTS:
            raise BadRequest(f"handout must be one of {', '.join(HANDOUTS)}, got {handout!r}")
        return cls(ifname, queues, start, mode, tag, pid, umem, handout)


REQUEST_FIELDS = tuple(f.name for f in fields(Request))


@dataclass(frozen=True)
class StatusQuery:
    """Ask for attachments and leases: those the caller may see (its own; an admin's, all),
    narrowed by the filters given (None: no filter)."""

    op: ClassVar[str] = "status"
    ifname: str | None = None
    lease_id: str | None = None
    uid: int | None = None

    @classmethod
    def from_body(cls, body: Body) -> StatusQuery:
        ifname = _field(body, "ifname", str, None, nullable=True)
        lease_id = _field(body, "lease_id", str, None, nullable=True)
        uid = _field(body, "uid", int, None, nullable=True)
        if uid is not None and not 0 <= uid < 1 << 32:
            raise BadRequest(f"uid must be 0..2^32-1, got {_shown(uid)}")
        return cls(
            None if ifname is None else validate_ifname(ifname),
            None if lease_id is None else validate_lease_id(lease_id),
            uid,
        )

    def matches(self, lease: LeaseInfo) -> bool:
        """Whether lease passes every filter given."""
        return (
            self.ifname in (None, lease.ifname)
            and self.lease_id in (None, lease.lease_id)
            and self.uid in (None, lease.uid, lease.consumer_uid)
        )


@dataclass(frozen=True)
class Ping:
    """Liveness check; the reply carries the broker's version."""

    op: ClassVar[str] = "ping"

    @classmethod
    def from_body(cls, body: Body) -> Ping:
        return cls()


@dataclass(frozen=True)
class Release:
    """End one of the caller's own leases now; its slots are emptied (the sockets the
    consumer holds stay open but receive nothing more)."""

    op: ClassVar[str] = "release"
    lease_id: str

    @classmethod
    def from_body(cls, body: Body) -> Release:
        return cls(validate_lease_id(_field(body, "lease_id", str)))


@dataclass(frozen=True)
class Revoke:
    """Admin: end someone's lease now and empty its slots (traffic back to the stack)."""

    op: ClassVar[str] = "revoke"
    lease_id: str

    @classmethod
    def from_body(cls, body: Body) -> Revoke:
        return cls(validate_lease_id(_field(body, "lease_id", str)))


@dataclass(frozen=True)
class Detach:
    """Remove the program and its pins from an interface (admin only)."""

    op: ClassVar[str] = "detach"
    ifname: str
    force: bool = False

    @classmethod
    def from_body(cls, body: Body) -> Detach:
        return cls(validate_ifname(_field(body, "ifname", str)), _field(body, "force", bool, False))


Message = Request | StatusQuery | Ping | Release | Revoke | Detach
MESSAGES: tuple[type[Message], ...] = (Request, StatusQuery, Ping, Release, Revoke, Detach)
OPS: dict[str, type[Message]] = {m.op: m for m in MESSAGES}
_KNOWN_FIELDS = {m.op: {"version", "op", *(f.name for f in fields(m))} for m in MESSAGES}


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
    unknown = sorted(set(body) - _KNOWN_FIELDS[kind.op])
    if unknown:
        named = ", ".join(repr(name[:MAX_NAME_ECHO]) for name in unknown[:MAX_NAMES_ECHOED])
        more = len(unknown) - MAX_NAMES_ECHOED
        raise BadRequest(
            f"unknown field(s) for op '{op}': {named}" + (f" and {more} more" if more > 0 else "")
        )
    try:
        return kind.from_body(body)
    except (UnicodeError, ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"a field of op '{op}' cannot be used: {exc}") from None


def encode_message(message: Message) -> bytes:
    """The datagram a client sends for message (None fields are left out)."""
    body: Body = {"version": PROTOCOL_VERSION, "op": message.op}
    body.update({k: v for k, v in vars(message).items() if v is not None})
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class LeaseInfo:
    """What the broker tells a client about a lease; the fds travel beside it.

    consumer_uid, rule and what a map lease hands out (dp_path: its device-plugin socket,
    map_pin: its pinned XSKMAP) travel in the wire's "extra" object, where v1 put them.
    """

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
    consumer_uid: int = -1
    rule: str = ""
    handout: str = "sockets"
    dp_path: str = ""
    map_pin: str = ""

    @property
    def start_queue(self) -> int:
        return self.queue_ids[0]

    def to_wire(self) -> Body:
        """The lease as JSON-ready fields (dataclasses.asdict's deep copy costs ~80 us)."""
        return {
            "lease_id": self.lease_id,
            "ifname": self.ifname,
            "ifindex": self.ifindex,
            "queue_ids": list(self.queue_ids),
            "mode": self.mode,
            "uid": self.uid,
            "pid": self.pid,
            "consumer_pid": self.consumer_pid,
            "tag": self.tag,
            "umem_bytes": self.umem_bytes,
            "created": self.created,
            "extra": {"consumer_uid": self.consumer_uid, "rule": self.rule}
            | (
                {"handout": self.handout, "dp_path": self.dp_path, "map_pin": self.map_pin}
                if self.handout != "sockets"
                else {}
            ),
        }

    @classmethod
    def from_wire(cls, body: Body) -> LeaseInfo:
        extra: Body = body.get("extra") or {}
        uid: int = body.get("uid", -1)
        return cls(
            lease_id=body["lease_id"],
            ifname=body["ifname"],
            ifindex=body["ifindex"],
            queue_ids=list(body["queue_ids"]),
            mode=body["mode"],
            uid=uid,
            pid=body.get("pid", 0),
            consumer_pid=body.get("consumer_pid", 0),
            tag=body.get("tag"),
            umem_bytes=body.get("umem_bytes", QEMU_UMEM_BYTES),
            created=body.get("created", 0.0),
            consumer_uid=extra.get("consumer_uid", uid),
            rule=extra.get("rule", ""),
            handout=extra.get("handout", "sockets"),
            dp_path=extra.get("dp_path", ""),
            map_pin=extra.get("map_pin", ""),
        )


@dataclass(frozen=True)
class AttachmentInfo:
    """The program on one interface, as status reports it."""

    ifname: str
    ifindex: int
    mode: str
    queue_count: int
    link_id: int
    prog_id: int
    pin_dir: str
    adopted: bool

    def to_wire(self) -> Body:
        return dict(vars(self))

    @classmethod
    def from_wire(cls, body: Body) -> AttachmentInfo:
        return cls(**{f.name: body[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Granted:
    """The reply to Request; the fds travel beside it, one per queue in queue order.

    netdev_template is deprecated (clients render the -netdev value from the lease and
    their own fd numbers); it is still sent so that v1 clients keep working.
    """

    op: ClassVar[str] = "request"
    lease: LeaseInfo

    def to_wire(self) -> Body:
        return {"lease": self.lease.to_wire(), "netdev_template": netdev_template(self.lease)}

    @classmethod
    def from_wire(cls, body: Body) -> Granted:
        return cls(LeaseInfo.from_wire(body["lease"]))


@dataclass(frozen=True)
class Pong:
    """The reply to Ping."""

    op: ClassVar[str] = "ping"
    broker: str
    pid: int

    def to_wire(self) -> Body:
        return {"broker": self.broker, "pid": self.pid}

    @classmethod
    def from_wire(cls, body: Body) -> Pong:
        return cls(str(body["broker"]), int(body["pid"]))


@dataclass(frozen=True)
class BrokerInfo:
    version: str
    pid: int
    policy: str


@dataclass(frozen=True)
class Status:
    """The reply to StatusQuery: at most a bounded number of leases, so it always fits one
    datagram. lease_count: every live lease; of those not listed, leases_filtered were left
    out as not the caller's or not matching the query's filters, leases_trimmed for the
    reply's size (the broker's maximum, or the datagram)."""

    op: ClassVar[str] = "status"
    broker: BrokerInfo
    attachments: list[AttachmentInfo]
    leases: list[LeaseInfo]
    lease_count: int
    leases_filtered: int = 0
    leases_trimmed: int = 0

    def to_wire(self) -> Body:
        return {
            "broker": dict(vars(self.broker)),
            "attachments": [a.to_wire() for a in self.attachments],
            "leases": [lease.to_wire() for lease in self.leases],
            "lease_count": self.lease_count,
            "leases_filtered": self.leases_filtered,
            "leases_trimmed": self.leases_trimmed,
        }

    @classmethod
    def from_wire(cls, body: Body) -> Status:
        """A broker older than the two counts left out only for size."""
        leases = [LeaseInfo.from_wire(x) for x in body["leases"]]
        count = int(body["lease_count"])
        filtered = int(body.get("leases_filtered", 0))
        return cls(
            BrokerInfo(
                str(body["broker"]["version"]),
                int(body["broker"]["pid"]),
                str(body["broker"]["policy"]),
            ),
            [AttachmentInfo.from_wire(a) for a in body["attachments"]],
            leases,
            count,
            filtered,
            int(body.get("leases_trimmed", count - filtered - len(leases))),
        )


@dataclass(frozen=True)
class Released:
    """The reply to Release."""

    op: ClassVar[str] = "release"
    lease_id: str

    def to_wire(self) -> Body:
        return {"lease_id": self.lease_id}

    @classmethod
    def from_wire(cls, body: Body) -> Released:
        return cls(str(body["lease_id"]))


@dataclass(frozen=True)
class Revoked:
    """The reply to Revoke: the queues whose traffic went back to the stack."""

    op: ClassVar[str] = "revoke"
    lease_id: str
    queue_ids: list[int]

    def to_wire(self) -> Body:
        return {"lease_id": self.lease_id, "queue_ids": list(self.queue_ids)}

    @classmethod
    def from_wire(cls, body: Body) -> Revoked:
        return cls(str(body["lease_id"]), list(body["queue_ids"]))


@dataclass(frozen=True)
class Detached:
    """The reply to Detach."""

    op: ClassVar[str] = "detach"
    ifname: str
    was_attached: bool

    def to_wire(self) -> Body:
        return {"ifname": self.ifname, "was_attached": self.was_attached}

    @classmethod
    def from_wire(cls, body: Body) -> Detached:
        return cls(str(body["ifname"]), bool(body["was_attached"]))


Reply = Granted | Pong | Status | Released | Revoked | Detached
REPLY_TO: dict[type[Message], type[Reply]] = {
    Request: Granted,
    Ping: Pong,
    StatusQuery: Status,
    Release: Released,
    Revoke: Revoked,
    Detach: Detached,
}


def encode_reply(reply: Reply) -> bytes:
    body: Body = {"version": PROTOCOL_VERSION, "ok": True, "op": reply.op}
    body.update(reply.to_wire())
    return json.dumps(body, separators=(",", ":")).encode()


def encode_error(error: BrokerError) -> bytes:
    """The failure reply; a message over MAX_ERROR_CHARS is cut there (and says so), so that
    an error reply always fits one datagram (12 bytes a character at most, as JSON)."""
    body = error.to_wire()
    if len(error.message) > MAX_ERROR_CHARS:
        cut = error.message[:MAX_ERROR_CHARS]
        body["message"] = f"{cut}... ({len(error.message)} characters, cut)"
    return json.dumps(
        {"version": PROTOCOL_VERSION, "ok": False, "error": body}, separators=(",", ":")
    ).encode()


def decode_reply(data: bytes, to: type[Message]) -> Reply:
    """The typed reply to a message of type to; a failure reply is raised as its typed
    BrokerError, and a reply of the wrong shape as ProtocolViolation."""
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
    kind = REPLY_TO[to]
    try:
        return kind.from_wire(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolViolation(f"broker's {kind.op} reply lacks a valid field: {exc!r}") from None


def qemu_escape(value: str) -> str:
    """QEMU's option syntax escapes ',' by doubling it."""
    return value.replace(",", ",,")


def netdev_value(netdev_id: str, lease: LeaseInfo, sock_fds: str) -> str:
    """QEMU's whole `-netdev` value for a lease (sock_fds already joined)."""
    return (
        f"af-xdp,id={qemu_escape(netdev_id)},ifname={qemu_escape(lease.ifname)},"
        f"mode={lease.mode},queues={len(lease.queue_ids)},start-queue={lease.start_queue},"
        f"inhibit=on,sock-fds={sock_fds}"
    )


def netdev_template(lease: LeaseInfo) -> str:
    """The deprecated reply field: the `-netdev` value with `{id}` and `{sock-fds}` left
    for the receiver to fill in (fd numbers are chosen by the receiving kernel)."""
    return netdev_value("{id}", lease, "{sock-fds}")
