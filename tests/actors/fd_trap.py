"""A hostile client that sends the broker an fd whose last close blocks.

argv: SOCKET_PATH VARIANT [IDLE]. The trap is one end of a loopback TCP pair (this process
needs lo up in its network namespace): its send queue is full because the other end is
never read, and SO_LINGER is about 2^31 s, so whoever closes its last copy waits until
this process exits. VARIANT says how it reaches the broker:

- ping, request, truncated: with a ping, a request, or a message too long to take whole,
  on a connection kept open;
- many: with a ping, as all 253 fds a message can carry (the kernel drops what the
  receiver has no room for, in the receiver's thread);
- hangup: with a ping, on a connection closed at once, the fd still queued;
- refused: after IDLE idle connections fill this uid's cap, on one more connection the
  broker refuses (and closes with the fd queued), closed by this side at once.

Prints "ready" once the idle connections are open and the trap is set, then waits for a
line on stdin (the test stops the broker meanwhile, so that this side's copy of the trap is
surely closed first and the broker's is the last), sends, closes its own copy, and prints
one JSON line: {"sent": true}, or the errno of the refused sendmsg ({"sent": false,
"errno": "EPERM"}; the trap is disarmed then, or its close would block this process).
Then it waits for another line before exiting (which frees whoever is blocked).
"""

import array
import errno
import json
import socket
import struct
import sys

PING = b'{"version":1,"op":"ping"}'
REQUEST = b'{"version":1,"op":"request","ifname":"lo","queues":1}'
MESSAGES = {
    "ping": PING,
    "request": REQUEST,
    "truncated": b" " * 70000,
    "many": PING,
    "hangup": PING,
    "refused": PING,
}


def trap() -> tuple[socket.socket, socket.socket]:
    """A connected TCP socket that cannot be closed quickly, and its unread peer."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 2**31 - 1))
    return sock, peer


def connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(path)
    return conn


def main(path: str, variant: str, idle_count: int) -> None:
    idle = [connect(path) for _ in range(idle_count)]
    sock, peer = trap()
    print("ready", flush=True)
    sys.stdin.readline()
    conn = connect(path)
    fds = [sock.fileno()] * (253 if variant == "many" else 1)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    try:
        conn.sendmsg([MESSAGES[variant]], ancillary)
        outcome: dict[str, object] = {"sent": True}
    except OSError as exc:
        outcome = {"sent": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
    sock.close()
    if variant in ("hangup", "refused"):
        conn.close()
    print(json.dumps(outcome), flush=True)
    sys.stdin.readline()
    del idle, peer, conn  # held open until here


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
