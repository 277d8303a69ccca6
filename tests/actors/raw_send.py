"""Sends datagrams exactly as given, each on its own connection, and prints the replies.

argv[1]: a JSON list of the datagrams as text (non-ASCII already JSON-escaped, so a lone
surrogate travels as the six characters of its escape). Prints a JSON list of the reply
bodies, in order.
"""

import json
import os
import socket
import sys


def exchange(path: str, datagram: str) -> object:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.send(datagram.encode())
        return json.loads(sock.recv(65536))


path = os.environ["XSK_BROKER_SOCKET"]
print(json.dumps([exchange(path, datagram) for datagram in json.loads(sys.argv[1])]))
