"""One request (or revoke) through client.sync, as whoever runs it: prints one JSON line.

argv[1] is a JSON object: Client.request()'s keyword arguments, or {"revoke": LEASE_ID}.
"""

import json
import sys
from typing import Any

from broker.errors import BrokerError
from client.sync import Client


def main(args: dict[str, Any]) -> dict[str, Any]:
    client = Client()
    try:
        if "revoke" in args:
            client.revoke(args["revoke"])
            return {"ok": True}
        with client.request(**args) as lease:
            return {"ok": True, "queues": lease.queue_ids}
    except BrokerError as error:
        return {"ok": False, "code": error.code, "message": error.message}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
