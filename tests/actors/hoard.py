"""A uid that hoards idle connections: opens COUNT, then reports how many the broker kept.

argv: SOCKET_PATH COUNT. Prints "open" once connected, waits for a line on stdin, then
prints one JSON line: {"open": how many are still open and silent, "codes": the error
codes of what the broker sent on the others (evictions and refusals) or "closed"}, and
waits for another line before exiting.
"""

import collections
import json
import socket
import sys


def outcome(conn: socket.socket) -> str | None:
    """None while the connection is open and the broker has said nothing on it."""
    try:
        data = conn.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return "closed"
    return json.loads(data)["error"]["code"] if data else "closed"


def main(path: str, count: int) -> None:
    conns = []
    for _ in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(path)
        conns.append(conn)
    print("open", flush=True)
    sys.stdin.readline()
    codes = collections.Counter(code for conn in conns if (code := outcome(conn)) is not None)
    print(json.dumps({"open": count - codes.total(), "codes": codes}), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
