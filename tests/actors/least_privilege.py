"""What `serve` does first, then proof that the kept capabilities still work.

Drops to the broker's capabilities (any argument means --allow-root), opens an AF_XDP
socket, and prints the capability sets and NoNewPrivs as JSON; exits with the error's one
line if the drop is refused.
"""

import json
import socket
import sys

from broker import caps
from broker.errors import BrokerError

AF_XDP = 44

try:
    caps.enter_least_privilege(allow_root=len(sys.argv) > 1)
except BrokerError as err:
    sys.exit(str(err))
socket.socket(AF_XDP, socket.SOCK_RAW, 0).close()
with open("/proc/self/status") as status_file:
    status = dict(line.split(":\t", 1) for line in status_file.read().splitlines())
sets = {k: sorted(v) for k, v in caps.current().items()}
print(json.dumps(sets | {"nnp": status["NoNewPrivs"]}))
