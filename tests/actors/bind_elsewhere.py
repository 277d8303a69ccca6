"""Leases two queues of $IFNAME and tries to bind the first socket to ifindex 1 (lo).

Prints {"loopback": "bound"} or the errno name the kernel refused it with; the second
socket is bound where it belongs, to show the lease itself works.
"""

import errno
import json
import os

from client.consumer import XskSocket
from client.sync import request

with request(os.environ["IFNAME"], 2, umem_bytes=1 << 20) as lease:
    try:
        XskSocket(lease.fds[0], 1, 0, frames=64)
        outcome = "bound"
    except OSError as exc:
        assert exc.errno is not None  # a refusal by the kernel carries its errno
        outcome = errno.errorcode[exc.errno]
    XskSocket(lease.fds[1], lease.ifindex, 1, frames=64).close()
print(json.dumps({"loopback": outcome}))
