"""ensure_bpffs() where none is mounted: prints whether bpffs was there before and after."""

import json

from broker.bpffs import ensure_bpffs, is_bpffs
from broker.config import DEFAULT_PIN_ROOT

before = is_bpffs(DEFAULT_PIN_ROOT.parent)
ensure_bpffs(DEFAULT_PIN_ROOT)
after = is_bpffs(DEFAULT_PIN_ROOT.parent)
print(json.dumps({"before": before, "after": after, "dir": DEFAULT_PIN_ROOT.is_dir()}))
