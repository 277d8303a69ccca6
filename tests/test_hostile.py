"""Hostile clients: the parser never breaks, and one bad caller never hurts the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import BrokerFactory, actor, piped

from broker.errors import BrokerError
from broker.protocol import Request as RequestMessage
from broker.protocol import decode_message, encode_message
from lab.brokerproc import REPO, BrokerProcess, wait_until
from lab.netlab import VethLab, run_unprivileged, spawn_unprivileged
from lab.traffic import client_env

VALID = encode_message(RequestMessage("eth0", 2, 1, "native", "vm7", None, 1 << 20))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


def parses_or_refuses(data: bytes) -> None:
    """The parser's whole contract: a typed message, or a BrokerError; nothing else."""
    try:
        decode_message(data)
    except BrokerError as error:
        assert error.code and error.message


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_parser_survives_arbitrary_bytes(data: bytes) -> None:
    parses_or_refuses(data)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "op", "ifname", "queues", "start_queue",
                                        "mode", "tag", "consumer_pid", "umem_bytes", "x"]),
                       json_values))  # fmt: skip
def test_parser_survives_arbitrary_fields(body: dict[str, Any]) -> None:
    parses_or_refuses(json.dumps(body).encode())


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6))
def test_parser_survives_mutated_valid_messages(flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for index, value in flips:
        data[index] = value
    parses_or_refuses(bytes(data))


@pytest.mark.kernel
def test_broker_survives_garbage_and_idle_connections_and_serves_meanwhile(
    lab4: VethLab, pin_root: Path, workdir: Path
) -> None:
    """500 idle connections and 10,000 malformed messages from one uid; root still served."""
    # the idle connections stay, however slowly the run goes (10 s of silence by default)
    limits = ("--max-connections-per-uid", "1000", "--rate-per-uid", "1000000",
              "--connection-deadline", "600")  # fmt: skip
    with BrokerProcess(lab4.ns_a, pin_root, workdir, *limits) as broker:
        client = broker.client()
        with client.request(lab4.ifname_a, 4, umem_bytes=1 << 20) as lease:
            client.release(lease.lease_id)  # the attachment's map and link fds stay
        baseline = broker.quiet_fd_count()
        attacker = spawn_unprivileged(
            actor("attacker", str(broker.socket_path), "500", "10000"),
            uid=61002, gid=61000, netns=lab4.ns_a, env=client_env(broker), cwd=str(REPO),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            out, err = piped(attacker.stdout), piped(attacker.stderr)
            assert out.readline().strip() == "idle", err.read()
            wait_until(lambda: broker.fd_count() >= baseline + 1000)  # sockets and pidfds
            for _ in range(20):
                with client.request(lab4.ifname_a, 4, umem_bytes=1 << 20) as lease:
                    assert len(lease.fds) == 4
                client.release(lease.lease_id)
            codes = json.loads(out.readline())
        finally:
            attacker.communicate("exit\n", timeout=30)
        assert sum(codes.values()) == 10000
        assert "closed" not in codes, codes
        assert {"BAD_MESSAGE", "BAD_REQUEST", "UNKNOWN_OP", "MESSAGE_TOO_LARGE",
                "EPERM"} <= set(codes), codes  # fmt: skip
        assert broker.settled_fd_count(baseline) == baseline
        assert broker.proc is not None and broker.proc.poll() is None


@pytest.mark.kernel
def test_connection_cap_per_uid_spares_other_uids(broker_factory: BrokerFactory) -> None:
    # the hog's connections must not time out before the refused ping (10 s by default)
    broker, lab = broker_factory("--max-connections-per-uid", "4", "--connection-deadline", "600")
    hog = spawn_unprivileged(
        actor("attacker", str(broker.socket_path), "4", "0"),
        netns=lab.ns_a, env=client_env(broker), cwd=str(REPO),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert piped(hog.stdout).readline().strip() == "idle"
        refused = run_unprivileged(
            [sys.executable, "-m", "xsk_broker", "ping"], netns=lab.ns_a,
            env=client_env(broker), cwd=str(REPO),
        )  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr.startswith("TOO_MANY_CONNECTIONS: uid 61000 already has 4")
        assert broker.client().ping().broker
    finally:
        hog.communicate("exit\n", timeout=30)


@pytest.mark.kernel
def test_rate_limit_per_uid_spares_other_uids(broker_factory: BrokerFactory) -> None:
    broker, lab = broker_factory("--rate-per-uid", "5")
    result = run_unprivileged(
        actor("ping_flood"), netns=lab.ns_a, env=client_env(broker), cwd=str(REPO)
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 20
    assert broker.client().ping().broker
