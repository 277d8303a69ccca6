"""The blocking client's own behaviour, against plain sockets standing in for the broker's
listener (no broker, no root): what it does when the broker is busy."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from broker.protocol import Pong, encode_reply
from client.sync import Client


def test_a_full_backlog_is_waited_out_not_reported_unreachable(tmp_path: Path) -> None:
    """A unix socket's connect() says EAGAIN while the listener's backlog is full: the
    broker is busy, not gone, so the client waits (as the asyncio client does)."""
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(0)
        listener.settimeout(5)  # the stand-in never outlives a failed test by long
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        filler.setblocking(False)
        filler.connect(path)  # the one pending connection a backlog of 0 holds

        def broker() -> None:
            time.sleep(0.3)
            first, _ = listener.accept()  # the filler's: the backlog has room again
            conn, _ = listener.accept()
            with first, conn:
                conn.recv(65536)
                conn.send(encode_reply(Pong("busy-broker", 1)))

        serving = threading.Thread(target=broker, daemon=True)
        serving.start()
        try:
            started = time.monotonic()
            assert Client(path, timeout=5).ping() == Pong("busy-broker", 1)
            assert time.monotonic() - started >= 0.25
        finally:
            serving.join(6)
            filler.close()
