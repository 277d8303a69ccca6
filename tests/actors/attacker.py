"""A hostile client: IDLE_COUNT idle connections, then GARBAGE malformed messages.

argv: SOCKET_PATH IDLE_COUNT GARBAGE. Prints "idle" once the idle connections are open,
then a JSON count of the reply codes ("closed" when the broker hung up, "EPERM" when the
kernel refused to send fds: SO_PASSRIGHTS), then waits for a line on stdin before exiting
(and so closing everything).
"""

import array
import collections
import json
import os
import random
import socket
import sys
from collections.abc import Callable


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(60)  # a loaded broker answers late, which is not "closed"
    s.connect(path)
    return s


def main(path: str, idle_count: int, garbage: int) -> None:
    idle = [connect(path) for _ in range(idle_count)]
    print("idle", flush=True)
    rng = random.Random(7)
    r, w = os.pipe()
    kinds: list[Callable[[], tuple[bytes, list[int]]]] = [
        lambda: (rng.randbytes(rng.randint(1, 200)), []),
        lambda: (b'{"version":1,"op":"request","ifname":"eth0","queues":', []),
        lambda: (
            json.dumps({"version": 1, "op": "request", "ifname": 7, "queues": "x"}).encode(),
            [],
        ),
        lambda: (json.dumps({"version": 1, "op": rng.choice(["x", "", None, 5])}).encode(), []),
        lambda: (b"{" * 70000, []),
        lambda: (b'{"version":1,"op":"ping"}', [r, w]),
        lambda: (b'{"version":1,"op":"ping"}', [r] * 40),
    ]
    codes: collections.Counter[str] = collections.Counter()
    conn = connect(path)
    for _ in range(garbage):
        data, fds = rng.choice(kinds)()
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                conn.sendmsg([data], ancillary)
            else:
                conn.send(data)
            reply = conn.recv(65536)
        except PermissionError:
            codes["EPERM"] += 1
            continue
        except OSError:
            reply = b""
        if not reply:
            codes["closed"] += 1
            conn.close()
            conn = connect(path)
            continue
        body = json.loads(reply)
        codes[body["error"]["code"] if not body["ok"] else "ok"] += 1
    print(json.dumps(codes), flush=True)
    sys.stdin.readline()
    del idle  # held open until here


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
