"""The wire contract on its own: decoding, errors, and the QEMU arguments built from a lease."""

from __future__ import annotations

import errno
import json

import pytest

from broker.errors import BadQueues, BrokerError, ProtocolViolation, QueueBusy
from broker.protocol import (
    MAX_MESSAGE_BYTES,
    Granted,
    LeaseInfo,
    Ping,
    Pong,
    Request,
    Status,
    StatusQuery,
    decode_message,
    decode_reply,
    encode_error,
    encode_message,
    encode_reply,
    netdev_template,
)
from client.lease import Lease

LEASE = LeaseInfo("abc", "eth,0", 3, [2, 3], "skb")


def test_request_round_trips_through_the_wire_format() -> None:
    request = Request("eth0", 4, 1, "native", "vm7", None, 1 << 20)
    assert decode_message(encode_message(request)) == request


def test_defaults_are_qemu_s() -> None:
    decoded = decode_message(b'{"version":1,"op":"request","ifname":"eth0","queues":2}')
    assert decoded == Request("eth0", 2, 0, "auto", None, None, 32 * 1024 * 1024)


def test_error_reply_becomes_the_typed_exception_with_errno() -> None:
    with pytest.raises(QueueBusy) as caught:
        decode_reply(encode_error(QueueBusy("queue 2 of eth0 is leased to pid 1")), Request)
    assert caught.value.errno == errno.EBUSY
    assert str(caught.value) == "QUEUE_BUSY: queue 2 of eth0 is leased to pid 1"


def test_unknown_error_code_keeps_its_code() -> None:
    data = json.dumps({"version": 1, "ok": False, "error": {"code": "NEW", "message": "m"}})
    with pytest.raises(BrokerError) as caught:
        decode_reply(data.encode(), Ping)
    assert caught.value.code == "NEW"


def test_queue_count_beyond_scm_max_fd_is_refused() -> None:
    with pytest.raises(BadQueues):
        decode_message(b'{"version":1,"op":"request","ifname":"eth0","queues":254}')


def test_typed_replies_round_trip_and_keep_v1_fields() -> None:
    granted = Granted(LeaseInfo("abc", "eth0", 3, [2], "skb", consumer_uid=7, rule="r"))
    body = json.loads(encode_reply(granted))
    assert body["lease"]["extra"] == {"consumer_uid": 7, "rule": "r"}  # where v1 put them
    assert body["netdev_template"] == netdev_template(granted.lease)  # deprecated, still sent
    assert decode_reply(encode_reply(granted), Request) == granted
    assert decode_reply(encode_reply(Pong("1.0", 5)), Ping) == Pong("1.0", 5)


def test_a_reply_missing_a_field_is_a_protocol_violation() -> None:
    data = json.dumps({"version": 1, "ok": True, "op": "status", "broker": {}})
    with pytest.raises(ProtocolViolation, match="status reply lacks a valid field"):
        decode_reply(data.encode(), StatusQuery)


def test_netdev_argument_escapes_commas_and_carries_mode() -> None:
    assert Lease(LEASE, [5, 6]).netdev_arg("n0") == (
        "af-xdp,id=n0,ifname=eth,,0,mode=skb,queues=2,start-queue=2,inhibit=on,sock-fds=5:6"
    )
    assert netdev_template(LEASE).endswith("sock-fds={sock-fds}")


def test_netdev_qmp_arguments() -> None:
    assert Lease(LEASE, [5, 6]).netdev_qmp("n0", ["x0", "x1"]) == {
        "type": "af-xdp",
        "id": "n0",
        "ifname": "eth,0",
        "mode": "skb",
        "queues": 2,
        "start-queue": 2,
        "inhibit": True,
        "sock-fds": "x0:x1",
    }


def test_an_unfiltered_status_query_is_v1_s_bytes_and_filters_round_trip() -> None:
    assert encode_message(StatusQuery()) == b'{"version":1,"op":"status"}'
    query = StatusQuery("eth0", "0123456789ab", 1000)
    assert decode_message(encode_message(query)) == query
    for bad in ('"ifname":"a/b"', '"lease_id":"x"', '"uid":-1', '"uid":true'):
        with pytest.raises(BrokerError, match="BAD_REQUEST"):
            decode_message(b'{"version":1,"op":"status",' + bad.encode() + b"}")


def test_status_from_an_older_broker_counts_everything_not_listed_as_trimmed() -> None:
    body = {"version": 1, "ok": True, "op": "status", "attachments": [], "lease_count": 9,
            "broker": {"version": "0.9", "pid": 1, "policy": "p"},
            "leases": [LEASE.to_wire()]}  # fmt: skip
    status = decode_reply(json.dumps(body).encode(), StatusQuery)
    assert isinstance(status, Status)
    assert (status.lease_count, status.leases_filtered, status.leases_trimmed) == (9, 0, 8)


def test_unknown_field_names_are_echoed_escaped_and_bounded() -> None:
    names = {f"f{n}\n\x1b" + "y" * 100: 1 for n in range(20)}
    with pytest.raises(BrokerError) as caught:
        decode_message(json.dumps({"version": 1, "op": "ping", **names}).encode())
    message = caught.value.message
    assert message.isprintable() and message.endswith(" and 12 more")
    assert "'f0\\n\\x1b" + "y" * 60 + "'" in message and "y" * 61 not in message


def test_an_error_reply_always_fits_one_datagram() -> None:
    data = encode_error(QueueBusy("\N{GRINNING FACE}" * 10000))
    assert len(data) < MAX_MESSAGE_BYTES
    with pytest.raises(QueueBusy) as caught:
        decode_reply(data, Request)
    assert caught.value.message.endswith("... (10000 characters, cut)")
