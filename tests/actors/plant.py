"""An attacker's move on the filesystem, made as whoever runs it: prints one JSON line.

argv: mkdir PATH MODE | write PATH TEXT | symlink TARGET PATH | rename OLD NEW. Prints
{"ok": true}, or {"ok": false, "errno": "EACCES"} when the kernel refused the move.
"""

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


def mkdir(path: str, mode: str) -> None:
    os.mkdir(path)
    os.chmod(path, int(mode, 8))


def write(path: str, text: str) -> None:
    Path(path).write_text(text)


MOVES: dict[str, Callable[[str, str], None]] = {
    "mkdir": mkdir,
    "write": write,
    "symlink": os.symlink,
    "rename": os.rename,
}

if __name__ == "__main__":
    move, first, second = sys.argv[1:]
    try:
        MOVES[move](first, second)
        print(json.dumps({"ok": True}))
    except OSError as exc:
        print(json.dumps({"ok": False, "errno": errno.errorcode.get(exc.errno or 0, "?")}))
