"""A tenant that holds leases and acts on them, one JSON command a line on stdin, one JSON
answer a line on stdout; it is the consumer of its leases, so they live until it exits.

Commands:
  {"lease": [KWARGS, ...]}    Client.request(**KWARGS) each -> {"leases": [ID, ...]}
  {"bind": [ID, INDEX, QUEUE]} bind fd INDEX of lease ID to QUEUE of its interface, as QEMU
                              would -> {"bound": QUEUE} or {"errno": "EBUSY"}
  {"release": ID}             Client.release(ID), the lease's sockets kept -> {"released": ID}
  {"status": FILTERS}         Client.status(**FILTERS) -> its wire form
A refused call answers {"code": CODE, "message": TEXT}.
"""

import errno
import json
import sys
from typing import Any

from broker.errors import BrokerError
from client.consumer import XskSocket
from client.lease import Lease
from client.sync import Client

client = Client()
leases: dict[str, Lease] = {}
bound: list[XskSocket] = []  # kept open: a bound socket keeps its queue


def bind(lease_id: str, index: int, queue: int) -> dict[str, Any]:
    lease = leases[lease_id]
    try:
        bound.append(XskSocket(lease.fds[index], lease.ifindex, queue, frames=64))
    except OSError as exc:
        assert exc.errno is not None  # a refusal by the kernel carries its errno
        return {"errno": errno.errorcode[exc.errno]}
    return {"bound": queue}


def answer(command: dict[str, Any]) -> dict[str, Any]:
    if "lease" in command:
        for args in command["lease"]:
            lease = client.request(**args)
            leases[lease.lease_id] = lease
        return {"leases": list(leases)[-len(command["lease"]) :]}
    if "bind" in command:
        return bind(*command["bind"])
    if "release" in command:
        return {"released": client.release(command["release"]).lease_id}
    return client.status(**command["status"]).to_wire()


for line in sys.stdin:
    try:
        reply = answer(json.loads(line))
    except BrokerError as error:
        reply = {"code": error.code, "message": error.message}
    print(json.dumps(reply), flush=True)
