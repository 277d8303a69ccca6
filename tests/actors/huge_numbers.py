"""Sends requests whose numbers are as large as the JSON parser takes (4299 digits) to
$XSK_BROKER_SOCKET, raw; prints {"codes": [CODE, ...], "reply_bytes": N}, one code a
request.

argv: IFNAME COUNT
"""

import json
import os
import socket
import sys

HUGE = "9" * 4299  # Python refuses integers of more than 4300 digits (int_max_str_digits)
ifname, count = sys.argv[1], int(sys.argv[2])
body = (
    json.dumps(
        {"version": 1, "op": "request", "ifname": ifname, "queues": 253, "umem_bytes": 4096}
    )[:-1]
    + f', "start_queue": {HUGE}}}'
)
codes, size = [], 0
for _ in range(count):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(os.environ["XSK_BROKER_SOCKET"])
        sock.send(body.encode())
        reply = sock.recv(1 << 17)
    size = max(size, len(reply))
    codes.append(json.loads(reply)["error"]["code"])
print(json.dumps({"codes": codes, "reply_bytes": size}))
