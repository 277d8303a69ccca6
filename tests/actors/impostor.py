"""Pretends to be the broker at argv[1]: answers whatever arrives with a pong of its own.

Prints "listening" once bound, then, after one connection (or 120 s without one), one JSON
line saying whether a request reached it.
"""

import json
import socket
import sys

from broker.protocol import Pong, encode_reply

with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
    listener.bind(sys.argv[1])
    listener.listen()
    listener.settimeout(120)
    print("listening", flush=True)
    received = b""
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(2)
            received = conn.recv(65536)
            conn.send(encode_reply(Pong("impostor", 1)))
    except OSError:
        pass
print(json.dumps({"request_seen": bool(received)}))
