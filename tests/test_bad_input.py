"""Bad input gets a structured error and changes nothing: no program, no slot, no fd."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from support import BrokerFactory, pins_of, xdp_of

from broker import fdpass
from broker.errors import BrokerError
from broker.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode_reply
from broker.protocol import Request as RequestMessage
from client.sync import Client
from lab.brokerproc import BrokerProcess
from lab.netlab import VethLab

pytestmark = pytest.mark.kernel


def body(**fields: object) -> bytes:
    return json.dumps({"version": PROTOCOL_VERSION, "op": "request", **fields}).encode()


def ask(broker: BrokerProcess, data: bytes, fds: list[int] | None = None) -> dict[str, Any]:
    """Send raw bytes, return the error object of the reply (failing if it was a success)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(broker.socket_path))
        fdpass.send(sock, data, fds or [])
        reply = json.loads(sock.recv(65536))
    assert reply["ok"] is False, reply
    error: dict[str, Any] = reply["error"]
    assert set(error) >= {"code", "errno", "message"}
    return error


def nothing_attached(lab: VethLab, pin_root: Path) -> None:
    assert xdp_of(lab) == {}
    assert pins_of(lab, pin_root) == []


def bad_requests(ifname: str) -> list[tuple[str, bytes, str]]:
    return [
        ("unknown interface", body(ifname="xskt-nonesuch", queues=1), "NO_SUCH_DEVICE"),
        ("queues 0", body(ifname=ifname, queues=0), "BAD_QUEUES"),
        ("queues negative", body(ifname=ifname, queues=-2), "BAD_QUEUES"),
        ("queues beyond device", body(ifname=ifname, queues=5), "BAD_QUEUES"),
        ("start queue beyond device", body(ifname=ifname, queues=1, start_queue=4), "BAD_QUEUES"),
        ("start queue negative", body(ifname=ifname, queues=1, start_queue=-1), "BAD_QUEUES"),
        ("range straddles the end", body(ifname=ifname, queues=2, start_queue=3), "BAD_QUEUES"),
        ("mode unknown", body(ifname=ifname, queues=1, mode="hw"), "MODE_UNSUPPORTED"),
        ("queues as string", body(ifname=ifname, queues="1"), "BAD_REQUEST"),
        ("queues as bool", body(ifname=ifname, queues=True), "BAD_REQUEST"),
        ("queues as float", body(ifname=ifname, queues=1.0), "BAD_REQUEST"),
        ("umem NaN", body(ifname=ifname, queues=1, umem_bytes=float("nan")), "BAD_REQUEST"),
        (
            "start queue beyond u32",
            body(ifname=ifname, queues=2, start_queue=2**32 - 1),
            "BAD_QUEUES",
        ),
        (
            "number of 4301 digits",
            body(ifname=ifname)[:-1] + b',"queues":1' + b"0" * 4300 + b"}",
            "BAD_MESSAGE",
        ),
        ("ifname with slash", body(ifname="a/b", queues=1), "BAD_REQUEST"),
        ("ifname with comma", body(ifname="a,script=x", queues=1), "NO_SUCH_DEVICE"),
        ("ifname too long", body(ifname="x" * 16, queues=1), "BAD_REQUEST"),
        ("missing ifname", body(queues=1), "BAD_REQUEST"),
        ("unknown field", body(ifname=ifname, queues=1, map_fd=3), "BAD_REQUEST"),
        ("malformed JSON", b'{"version": 1, "op": "request", ', "BAD_MESSAGE"),
        ("not UTF-8", b"\xff\xfe{}", "BAD_MESSAGE"),
        ("JSON array", b"[1, 2]", "BAD_MESSAGE"),
        ("wrong version", json.dumps({"version": 2, "op": "ping"}).encode(), "BAD_VERSION"),
        ("unknown op", json.dumps({"version": 1, "op": "give_me_root"}).encode(), "UNKNOWN_OP"),
        ("oversized", b" " * (MAX_MESSAGE_BYTES + 10), "MESSAGE_TOO_LARGE"),
        ("deeply nested", b"[" * 60000, "BAD_MESSAGE"),
        ("lone surrogate in ifname", body(ifname="\ud800", queues=1), "BAD_REQUEST"),
        (
            "consumer pid beyond any pid",
            body(ifname=ifname, queues=1, consumer_pid=2**64),
            "BAD_REQUEST",
        ),
        (
            "lease id not hex",
            json.dumps({"version": 1, "op": "release", "lease_id": "x" * 999}).encode(),
            "BAD_REQUEST",
        ),
        (
            "detach with lone surrogate",
            json.dumps({"version": 1, "op": "detach", "ifname": "\ud800"}).encode(),
            "BAD_REQUEST",
        ),
    ]


def test_every_bad_request_is_refused_and_changes_nothing(
    broker4: BrokerProcess, lab4: VethLab, pin_root: Path
) -> None:
    baseline = broker4.quiet_fd_count()
    for name, data, code in bad_requests(lab4.ifname_a):
        error = ask(broker4, data)
        assert error["code"] == code, (name, error)
        assert error["message"], name
    nothing_attached(lab4, pin_root)
    assert broker4.settled_fd_count(baseline) == baseline
    assert Client(broker4.socket_path).status().leases == []
    assert broker4.stop() == 0, "SIGTERM must end the broker cleanly"


@pytest.mark.parametrize("passrights", ["on", "off"])
def test_fds_sent_by_a_client_are_refused_and_closed(
    broker_factory: BrokerFactory, pin_root: Path, passrights: str
) -> None:
    """With SO_PASSRIGHTS (Linux 6.16+) the client's sendmsg fails with EPERM; without it
    (as on older kernels) the broker closes them and answers FDS_REFUSED."""
    broker, lab = broker_factory(*(["--without-passrights"] if passrights == "off" else []))
    baseline = broker.quiet_fd_count()
    read_end, write_end = os.pipe()
    try:
        if passrights == "on":
            with pytest.raises(PermissionError):
                ask(broker, body(ifname=lab.ifname_a, queues=1), [read_end, write_end])
        else:
            error = ask(broker, body(ifname=lab.ifname_a, queues=1), [read_end, write_end])
            assert error["code"] == "FDS_REFUSED"
            assert "2 closed" in error["message"]
    finally:
        os.close(read_end)
        os.close(write_end)
    assert broker.settled_fd_count(baseline) == baseline
    nothing_attached(lab, pin_root)


def test_mode_conflicting_with_the_attachment_is_refused_without_change(
    broker4: BrokerProcess, lab4: VethLab
) -> None:
    client = Client(broker4.socket_path)
    with client.request(lab4.ifname_a, 1, mode="native", umem_bytes=1 << 20):
        pass
    before = client.status().attachments
    error = ask(broker4, body(ifname=lab4.ifname_a, queues=1, start_queue=1, mode="skb"))
    assert error["code"] == "MODE_UNSUPPORTED"
    assert "native mode" in error["message"]
    assert client.status().attachments == before


def test_error_reply_decodes_to_the_typed_exception(broker4: BrokerProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(broker4.socket_path))
        sock.send(body(ifname="xskt-nonesuch", queues=1))
        data = sock.recv(65536)
    with pytest.raises(BrokerError) as caught:
        decode_reply(data, RequestMessage)
    assert type(caught.value).__name__ == "NoSuchDevice"
    assert caught.value.errno == 19
