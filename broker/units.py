"""Put the shipped systemd units, sysusers/tmpfiles snippets and polkit files in place.

Used by `xsk-broker install-units` and by the container tests, so the files a test boots
with are exactly the files an operator installs. Everything goes to the vendor directories
(/usr/lib/..., /usr/share/...) under prefix, like a distribution package would, leaving
/etc to the administrator's drop-ins. The files are read from broker/shipped/, package
data in the wheel and links to systemd/, polkit/ and examples/ in a checkout.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "shipped"
UNITS = ("xsk-broker.socket", "xsk-broker.service")
# Units running `xsk-broker`, installed with ExecStart= pointing at it; not enabled here.
SERVICES = ("xsk-broker.service", "xsk-broker-libvirt-watch.service")
UNIT_DIR = Path("usr/lib/systemd/system")
SYSUSERS = (Path("xsk-broker.sysusers.conf"), Path("usr/lib/sysusers.d/xsk-broker.conf"))
TMPFILES = (Path("xsk-broker.tmpfiles.conf"), Path("usr/lib/tmpfiles.d/xsk-broker.conf"))
POLKIT_ACTIONS = Path("usr/share/polkit-1/actions")
EXAMPLES = Path("usr/share/doc/xsk-broker/examples")
DEFAULT_EXEC_PATH = "/usr/bin/xsk-broker"
# What makes the installed files take effect on a running system, in order.
POST_INSTALL = (
    ("systemd-sysusers", "/usr/lib/sysusers.d/xsk-broker.conf"),
    ("systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/xsk-broker.conf"),
    ("systemctl", "daemon-reload"),
    ("systemctl", "enable", "--now", "xsk-broker.socket"),
)


def service_text(exec_path: str, name: str = "xsk-broker.service") -> str:
    """The shipped service unit name with ExecStart= pointing at exec_path."""
    if not exec_path.startswith("/") or re.search(r"[\s%\\\"']", exec_path):
        raise ValueError(
            f"exec_path must be an absolute path without spaces, quotes or '%': {exec_path!r}"
        )
    text = (SHIPPED / "systemd" / name).read_text()
    return re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={exec_path}", text, count=1)


def _copy(source: Path, target: Path, installed: list[Path]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o644)
    installed.append(target)


def install_units(prefix: Path, exec_path: str = DEFAULT_EXEC_PATH) -> list[Path]:
    """Install units, sysusers/tmpfiles snippets, polkit actions and examples under prefix.

    prefix is the root of the target file system ("/" for this machine, or a package
    staging directory). Returns the files written. Run POST_INSTALL afterwards on a live
    system.
    """
    systemd = SHIPPED / "systemd"
    installed: list[Path] = []
    _copy(systemd / "xsk-broker.socket", prefix / UNIT_DIR / "xsk-broker.socket", installed)
    for unit in SERVICES:
        service = prefix / UNIT_DIR / unit
        service.parent.mkdir(parents=True, exist_ok=True)
        service.write_text(service_text(exec_path, unit))
        service.chmod(0o644)
        installed.append(service)
    for name, target in (SYSUSERS, TMPFILES):
        _copy(systemd / name, prefix / target, installed)
    polkit = SHIPPED / "polkit"
    for action in sorted(polkit.glob("*.policy")):
        _copy(action, prefix / POLKIT_ACTIONS / action.name, installed)
    examples = sorted(polkit.glob("*.rules.example")) + sorted(
        (SHIPPED / "examples").glob("policy*")
    )
    for example in examples:
        _copy(example, prefix / EXAMPLES / example.name, installed)
    return installed
