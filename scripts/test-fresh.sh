#!/bin/sh
# usage: scripts/test-fresh.sh [REV]   (root; default REV: HEAD)
#
# CI as on a new machine: a fresh clone of REV in a directory other uids cannot traverse
# (mode 0700, as root's clone under /root is), every cache of the test suite pointed at an
# empty directory (the container rootfs, the af-xdp QEMU, the guest image, pip), then
# `CI=true bash .ci/run`, then `make demo`. Prints how long it took; removes what it made.
# Host packages installed earlier are not removed: scripts/setup.sh installs what is missing.
set -eu
umask 022  # the clone must be readable by the tests' other uids once inside the closed dir

rev=${1:-HEAD}
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d /tmp/xsk-broker-fresh.XXXXXX)     # 0700: closed to other uids
# Beside the default cache (/var/cache/xsk-broker-tests), not under a world-writable /tmp or
# /var/tmp: DPDK's EAL refuses plugins (-d) below any directory others may write.
cache=$(mktemp -d /var/cache/xsk-broker-fresh-cache.XXXXXX)
chmod 0755 "$cache"                                  # unprivileged QEMU runs from here
trap 'rm -rf --one-file-system "$work" "$cache"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

git clone --quiet --no-local "$repo" "$work/clone"
git -C "$work/clone" checkout --quiet "$rev"
start=$(date +%s)
status=0
(
    cd "$work/clone"
    export XSK_BROKER_TEST_CACHE="$cache" PIP_CACHE_DIR="$work/pip-cache"
    # (set -e does not act inside a subshell tested with ||, hence the && chain)
    CI=true bash .ci/run </dev/null &&
        echo "test-fresh: .ci/run passed after $(($(date +%s) - start)) s; now make demo" &&
        make demo </dev/null
) || status=$?
echo "test-fresh: exit $status after $(($(date +%s) - start)) s (clone $work/clone, cache $cache)"
exit "$status"
