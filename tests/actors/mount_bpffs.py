"""ensure_bpffs() where none is mounted: prints whether bpffs was there before and after,
and the mode of the mount it made."""

import json

from broker.bpffs import ensure_bpffs, is_bpffs
from broker.config import DEFAULT_PIN_ROOT

before = is_bpffs(DEFAULT_PIN_ROOT.parent)
ensure_bpffs(DEFAULT_PIN_ROOT)
after = is_bpffs(DEFAULT_PIN_ROOT.parent)
mode = f"{DEFAULT_PIN_ROOT.parent.stat().st_mode & 0o7777:04o}"
print(
    json.dumps({"before": before, "after": after, "dir": DEFAULT_PIN_ROOT.is_dir(), "mode": mode})
)
