"""A consumer of a lent AF_XDP socket: binds it and sends 8 frames.

argv: FD IFINDEX FRAMES DST_MAC SRC_MAC. Prints {"sent": N}, or the OSError's errno and
message (a UMEM over RLIMIT_MEMLOCK, say) as JSON.
"""

import json
import sys

from client.consumer import XskSocket, make_frame

fd, ifindex, frames = map(int, sys.argv[1:4])
dst, src = sys.argv[4:]
try:
    with XskSocket(fd, ifindex, 0, frames=frames) as xsk:
        sent = xsk.send([make_frame(dst, src, b"unprivileged %d" % i) for i in range(8)])
    print(json.dumps({"sent": sent}))
except OSError as err:
    print(json.dumps({"errno": err.errno, "message": err.strerror}))
