#!/bin/sh
# usage: scripts/public-view.sh COMMAND...   (from the checkout; root)
#
# Runs COMMAND from a path of this checkout that every uid can traverse. The demo and the
# tests start unprivileged processes (other uids, no capabilities) that execute the venv's
# python and import the checkout; a clone under a 0700 directory such as /root would lock
# them out. Where some parent directory is closed to others, COMMAND runs in a private mount
# namespace in which the checkout is bind-mounted on a fresh 0755 directory under /tmp; the
# mount disappears with COMMAND's last process and the directory is removed afterwards.
# Nothing on the host changes, and the checkout's location does not matter.
set -eu

repo=$(pwd -P)

# Mode bits for "other" (numeric, so that an ACL's "+" in ls-style modes cannot confuse it).
other_bits() {
    echo $(($(stat -c %#a "$1") & 7))
}

if [ $(($(other_bits "$repo") & 5)) -ne 5 ]; then
    echo "public-view: $repo is closed to other uids (mode $(stat -c %a "$repo")); clone it with umask 022" >&2
    exit 1
fi

others_can_reach() {
    dir=$1
    while [ "$dir" != / ]; do
        dir=$(dirname "$dir")
        [ $(($(other_bits "$dir") & 1)) -eq 1 ] || return 1
    done
}

if others_can_reach "$repo"; then
    exec "$@"
fi

view=$(mktemp -d /tmp/xskt-view.XXXXXX)
trap 'rmdir "$view"' EXIT
trap : INT TERM
chmod 0755 "$view"
status=0
unshare --mount --propagation slave sh -eu -c '
    mount --bind "$1" "$2"
    cd "$2"
    shift 2
    exec "$@"
' public-view "$repo" "$view" "$@" || status=$?
exit "$status"
