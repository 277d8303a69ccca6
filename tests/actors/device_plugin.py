"""Speak the AF_XDP device-plugin protocol as DPDK's af_xdp PMD does (one connection, text
commands without NUL, replies read into 128 bytes; /config_busy_poll goes with an fd, as
CNDP sends it): argv[1] is the socket path, argv[2] the
interface, argv[3:] extra commands to send. Prints one JSON object: each reply's text, how
many fds came with it and the map type of each (17 is an XSKMAP; "EPERM" where the kernel
refused to send the fd), and, when a map came,
whether this uid could fill its slot 0 with an AF_XDP socket of its own (DPDK does that).
"""

import array
import ctypes
import json
import socket
import sys

path, ifname, *extra = sys.argv[1:]
replies = []
map_fd = -1
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
    try:
        sock.connect(path)
    except OSError as exc:
        print(json.dumps({"connect_error": exc.errno}))
        sys.exit(0)
    for command in ["/connect,not-checked", "/version", f"/xsk_map_fd,{ifname}", *extra, "/fin"]:
        if command.startswith("/config_busy_poll"):  # sent with the client's socket attached
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as mine:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [mine.fileno()]))]
                try:
                    sock.sendmsg([command.encode()], rights)
                except PermissionError:  # the broker's socket refuses fds (SO_PASSRIGHTS=0)
                    replies.append({"sent": command, "reply": "EPERM", "fds": 0, "types": []})
                    continue
        else:
            sock.send(command.encode())
        data, anc, _flags, _addr = sock.recvmsg(128, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % 4])
        types = []
        for fd in fds:
            with open(f"/proc/self/fdinfo/{fd}") as info:
                types += [int(line.split()[1]) for line in info if line.startswith("map_type")]
            map_fd = fd
        replies.append({"sent": command, "reply": data.decode(), "fds": len(fds), "types": types})
filled = None
if map_fd >= 0:
    libbpf = ctypes.CDLL("libbpf.so.1")
    try:
        xsk = socket.socket(44, socket.SOCK_RAW, 0)
    except OSError as exc:
        filled = f"no AF_XDP socket: {exc.strerror}"
    else:
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(xsk.fileno())
        filled = libbpf.bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), 0)
print(json.dumps({"replies": replies, "filled": filled}))
