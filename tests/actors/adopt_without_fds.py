"""Adopt the pins of ifindex argv[2] under pin root argv[1] with no fd left to open them.

Prints the BrokerError's code and errno as JSON ({"code": null} if adoption succeeded).
"""

import json
import os
import resource
import sys
from pathlib import Path

from broker import bpf
from broker.errors import BrokerError
from broker.loader import Loader

loader = Loader(Path(sys.argv[1]))
bpf._libbpf()  # loaded before the limit: only the pins' fds must be refused
in_use = len(os.listdir("/proc/self/fd")) - 1  # one more fits: the listing, then the link
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 1, in_use + 1))
try:
    loader.adopt_one(int(sys.argv[2]))
    print(json.dumps({"code": None}))
except BrokerError as error:
    print(json.dumps({"code": error.code, "errno": error.errno}))
