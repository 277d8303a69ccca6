"""Leases one queue of $IFNAME and tries on its socket what would widen the grant: undo or
move SO_BINDTODEVICE, mark or prioritise its frames beyond what a user may, then binds it
where it belongs. Prints {ATTEMPT: "ok" or the errno name, ..., "bound_to": IFINDEX}.
"""

import errno
import json
import os
import socket
import struct

from client.consumer import XskSocket
from client.sync import request

AF_XDP = 44
SO_BINDTOIFINDEX = 62
ATTEMPTS = {
    "unbind_device": (socket.SO_BINDTODEVICE, b""),
    "bind_device_lo": (socket.SO_BINDTODEVICE, b"lo"),
    "bind_ifindex_lo": (SO_BINDTOIFINDEX, struct.pack("i", 1)),
    "mark": (socket.SO_MARK, struct.pack("i", 1)),
    "priority_7": (socket.SO_PRIORITY, struct.pack("i", 7)),
}

outcome: dict[str, object] = {}
with request(os.environ["IFNAME"], 1, umem_bytes=1 << 20) as lease:
    sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0, fileno=os.dup(lease.fds[0]))
    for name, (option, value) in ATTEMPTS.items():
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, value)
            outcome[name] = "ok"
        except OSError as exc:
            assert exc.errno is not None  # a refusal by the kernel carries its errno
            outcome[name] = errno.errorcode[exc.errno]
    outcome["bound_to"] = struct.unpack(
        "i", sock.getsockopt(socket.SOL_SOCKET, SO_BINDTOIFINDEX, 4)
    )[0]
    sock.close()
    XskSocket(lease.fds[0], lease.ifindex, lease.queue_ids[0], frames=64).close()
print(json.dumps(outcome))
