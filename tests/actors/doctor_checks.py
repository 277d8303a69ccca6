"""run_checks(SOCKET, queues=argv[2]) as JSON, for another uid or mount namespace."""

import dataclasses
import json
import sys

from xsk_broker.doctor import run_checks

checks = run_checks(sys.argv[1], None, None, int(sys.argv[2]))
print(json.dumps({c.name: dataclasses.asdict(c) for c in checks}))
