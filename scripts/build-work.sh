# Sourced by the cache builders (qemu-afxdp.sh, dpdk-rootfs.sh) once they have set $name (for
# messages), $dest, $work (a fresh directory beside $dest) and $log (inside $work): makes
# $work and removes it on any exit, never through a mount, with the log's tail on failure.
# lab/ keys each builder's cache entry by its own bytes and this file's.

cleanup() {
    status=$?
    trap - EXIT INT TERM
    if [ -d "$work" ]; then
        # Nothing should stay mounted here, but never rm through a mount.
        grep -F " $work/" /proc/self/mounts | cut -d' ' -f2 | sort -r | while read -r m; do
            umount -l "$m" || true
        done
        if [ "$status" -ne 0 ] && [ -f "$log" ]; then
            echo "$name: failed (exit $status); last 30 lines of $log:" >&2
            tail -n 30 "$log" >&2
        fi
        rm -rf --one-file-system "$work"
    fi
    exit "$status"
}
mkdir -p "$(dirname "$dest")"
mkdir "$work"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
: >"$log"
