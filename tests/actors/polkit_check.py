"""Asks polkitd (bus argv[2]) whether pid argv[1] of uid 61001 may request veth0's queue.

Prints "granted" or the Denied message.
"""

import sys

from broker import polkit
from broker.errors import Denied

subject = polkit.subject_of(int(sys.argv[1]), 61001)
details = {"interface": "veth0", "queues": "1"}
try:
    polkit.check(subject, "org.xsk-broker.request", details, bus_address=sys.argv[2])
    print("granted")
except Denied as exc:
    print(exc)
