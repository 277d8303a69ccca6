"""What makes the suite run anywhere: the public view of a checkout under a closed directory,
and the lab cache refusing a place others could change (root runs what is in it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import cache as labcache
from lab.brokerproc import REPO
from lab.netlab import UNPRIVILEGED_GID, UNPRIVILEGED_UID, run_unprivileged

pytestmark = pytest.mark.kernel
PUBLIC_VIEW = REPO / "scripts" / "public-view.sh"


@pytest.fixture
def closed_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="xskt-closed-"))  # 0700, as /root is
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_public_view_lets_other_uids_reach_a_checkout_under_a_closed_dir(
    closed_dir: Path,
) -> None:
    checkout = closed_dir / "clone"
    checkout.mkdir(mode=0o755)
    (checkout / "marker").write_text("reached\n")
    direct = run_unprivileged(["cat", str(checkout / "marker")])
    assert direct.returncode != 0  # the premise: other uids cannot get in
    viewed = subprocess.run(
        [str(PUBLIC_VIEW), "sh", "-c",
         f"setpriv --reuid={UNPRIVILEGED_UID} --regid={UNPRIVILEGED_GID} --clear-groups "
         "cat \"$PWD/marker\"; echo \"$PWD\""],
        cwd=checkout, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert viewed.returncode == 0, viewed.stderr
    content, view = viewed.stdout.splitlines()
    assert content == "reached"
    assert not Path(view).exists()  # the view's directory is gone with the command


def test_public_view_refuses_a_checkout_closed_itself(closed_dir: Path) -> None:
    checkout = closed_dir / "clone"
    checkout.mkdir(mode=0o700)
    refused = subprocess.run(
        [str(PUBLIC_VIEW), "true"], cwd=checkout, capture_output=True, text=True, check=False
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("public-view: ") and "umask 022" in refused.stderr


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o777, 0, "writable by others"),
        (0o755, UNPRIVILEGED_UID, f"belongs to uid {UNPRIVILEGED_UID}"),
        (0o750, 0, "not traversable by other users"),
    ],
)
def test_lab_cache_refuses_a_place_others_could_change(
    closed_dir: Path, mode: int, owner: int, why: str
) -> None:
    closed_dir.chmod(0o755)
    cache = closed_dir / "cache"
    cache.mkdir()
    os.chown(cache, owner, 0)
    cache.chmod(mode)
    with pytest.raises(labcache.CacheNotTrusted, match=why):
        labcache.check_trusted(cache)
    cache.chmod(0o755)
    os.chown(cache, 0, 0)
    labcache.check_trusted(cache)  # root's, open to read, closed to write: fine
