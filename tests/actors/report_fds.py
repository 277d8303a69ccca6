"""The COMMAND of `xsk-broker request`: writes what it inherited to the file argv[1].

The fds named by XSK_BROKER_SOCK_FDS, their socket families (SO_DOMAIN; Python's socket()
cannot wrap AF_XDP, which has no getsockname), every fd it found open, the rest of its
argv, XSK_BROKER_NETDEV and its uid, as JSON.
"""

import ctypes
import json
import os
import sys

SOL_SOCKET, SO_DOMAIN = 1, 39


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# Before anything else is opened; the listing's own fd is closed again by then.
inherited = [fd for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")) if is_open(fd)]

libc = ctypes.CDLL(None)
fds = [int(f) for f in os.environ["XSK_BROKER_SOCK_FDS"].split(":")]
families = []
for fd in fds:
    value, size = ctypes.c_int(), ctypes.c_uint(4)
    libc.getsockopt(fd, SOL_SOCKET, SO_DOMAIN, ctypes.byref(value), ctypes.byref(size))
    families.append(value.value)
with open(sys.argv[1], "w") as out:
    seen = {
        "argv": sys.argv[2:],
        "fds": fds,
        "open": inherited,
        "families": families,
        "netdev": os.environ["XSK_BROKER_NETDEV"],
        "uid": os.getuid(),
    }
    json.dump(seen, out)
