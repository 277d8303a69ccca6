"""A map lease's consumer that makes its own AF_XDP socket, as DPDK does, and then tries
to reach other queues through the map it was given.

argv: DP_PATH IFNAME BIND_QUEUE SLOTS READY_FILE STOP_FILE. Gets the lease's XSKMAP over
the device-plugin socket, binds a socket (own UMEM; needs CAP_NET_RAW) to BIND_QUEUE, puts
it in every slot of SLOTS (comma separated; BPF_ANY replaces what is there), touches
READY_FILE, counts frames until STOP_FILE exists and none came for half a second (or for
two minutes at most), and prints {"received": N, "filled": [rc per slot]}.
"""

import array
import ctypes
import json
import socket
import sys
import time
from pathlib import Path

from client.consumer import XskSocket

path, ifname, bind_queue, slots, ready, stop = sys.argv[1:]
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
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    got = len(xsk.receive(timeout=0.5))
    received += got
    if not got and Path(stop).exists():
        break
print(json.dumps({"received": received, "filled": filled}))
