"""A map lease's consumer that makes its own AF_XDP socket, as DPDK does, and then tries
to reach other queues through the map it was given.

argv: DP_PATH IFNAME BIND_QUEUE SLOTS READY_FILE SECONDS. Gets the lease's XSKMAP over the
device-plugin socket, binds a socket (own UMEM; needs CAP_NET_RAW) to BIND_QUEUE, puts it in
every slot of SLOTS (comma separated; BPF_ANY replaces what is there), touches READY_FILE,
counts frames for SECONDS and prints {"received": N, "filled": [rc per slot]}.
"""

import array
import ctypes
import json
import socket
import sys
import time
from pathlib import Path

from client.consumer import XskSocket

path, ifname, bind_queue, slots, ready, seconds = sys.argv[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as dp:
    dp.connect(path)
    dp.send(f"/xsk_map_fd,{ifname}".encode())
    _data, anc, _flags, _addr = dp.recvmsg(128, socket.CMSG_SPACE(4))
    fds = array.array("i")
    for _level, _kind, payload in anc:
        fds.frombytes(payload[:4])
map_fd = fds[0]
xsk_sock = socket.socket(44, socket.SOCK_RAW, 0)
xsk = XskSocket(xsk_sock.fileno(), socket.if_nametoindex(ifname), int(bind_queue), frames=128)
libbpf = ctypes.CDLL("libbpf.so.1")
filled = []
for slot in slots.split(","):
    key, value = ctypes.c_uint32(int(slot)), ctypes.c_uint32(xsk_sock.fileno())
    filled.append(libbpf.bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), 0))
Path(ready).touch()
received = 0
deadline = time.monotonic() + float(seconds)
while time.monotonic() < deadline:
    received += len(xsk.receive(timeout=0.1))
print(json.dumps({"received": received, "filled": filled}))
