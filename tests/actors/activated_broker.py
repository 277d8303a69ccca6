"""A minimal broker: take the socket, say READY, answer one connection, say STOPPING.

argv[1] is the path it would bind by hand (it must not: the socket is inherited). The
connection receives what it saw of the inherited socket as JSON.
"""

import json
import os
import sys

from broker import activation

sock = activation.listening_socket(sys.argv[1])
notifier = activation.Notifier()
notifier.ready("serving")
notifier.status("0 leases")
conn, _ = sock.accept()
seen = {
    "sockname": sock.getsockname(),
    "fd": sock.fileno(),
    "inheritable": sock.get_inheritable(),
    "listen_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
conn.send(json.dumps(seen).encode())
conn.close()
notifier.stopping()
