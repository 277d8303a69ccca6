#!/bin/sh
# Build a Debian trixie rootfs with DPDK 24.11 (dpdk-testpmd and the af_xdp PMD), for the
# tests and the bench that run DPDK's unmodified PMD against the broker.
#
# Debian 12's DPDK (22.11) has no device-plugin mode (use_cni) and no use_pinned_map; trixie
# ships 24.11, which has both, and it needs trixie's libc. So: debootstrap a minbase trixie
# and install trixie's packages. Nothing is compiled. dpdk-testpmd is in trixie's dpdk-dev,
# whose libdpdk-dev dependency drags in every -dev package of DPDK's; so the runtime
# libraries dpdk-dev depends on are installed and testpmd alone is unpacked from it. The tests run testpmd from the host's
# view through the rootfs's ld.so (lab/dpdk.py), no chroot, so host paths (the device-plugin
# socket, bpffs pins) mean what they say.
#
# usage: dpdk-rootfs.sh DEST
# Built under DEST.tmp-PID and renamed at the end (an entry is complete or absent); each
# step that mounts runs in its own private mount and PID namespace, as in qemu-afxdp.sh.
set -eu

dest=${1:?usage: dpdk-rootfs.sh DEST}
[ ! -e "$dest" ] || { echo "dpdk-rootfs: $dest exists" >&2; exit 1; }
umask 022
mirror=$(sh "$(dirname "$0")/debian-mirror.sh")
work=$dest.tmp-$$
root=$work/root
log=$work/build.log
# The PMDs are plugins testpmd is told to load with -d (lab/dpdk.py).
packages="librte-net-af-xdp25 librte-mempool-ring25"

name=dpdk-rootfs
. "$(dirname "$0")/build-work.sh"

isolated() {
    unshare --mount --propagation private --pid --fork --kill-child "$@"
}

if ! command -v debootstrap >/dev/null 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends debootstrap; } >>"$log" 2>&1
fi

echo "dpdk-rootfs: debootstrap trixie with $packages from $mirror" >&2
isolated debootstrap --variant=minbase --include="$(echo $packages | tr ' ' ,)" \
    trixie "$root" "$mirror" >>"$log" 2>&1
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# shellcheck disable=SC2016 # expanded inside the chroot
isolated --mount-proc="$root/proc" chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive sh -c '
    set -eu
    apt-get -q update
    deps=$(apt-cache depends dpdk-dev | awk "/ Depends:/ && !/libdpdk-dev|python3/ { print \$2 }")
    apt-get -q -y --no-install-recommends install $deps
    cd /tmp && apt-get -q download dpdk-dev
    dpkg-deb --fsys-tarfile dpdk-dev_*.deb | tar -x -C / ./usr/bin/dpdk-testpmd
    rm -f dpdk-dev_*.deb
    if ldd /usr/bin/dpdk-testpmd | grep "not found"; then exit 1; fi
    apt-get clean
' >>"$log" 2>&1
rm -rf "$root/etc/resolv.conf" "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/* "$root/usr/share/doc" \
    "$root/usr/share/man" "$root/usr/share/locale"

# Unprivileged uids run testpmd from here: no setuid or setgid binaries, nothing writable.
find "$root" -xdev -type f -perm /6000 -exec chmod ug-s {} +
find "$root" -xdev -type d -perm -0002 -exec chmod o-w,-t {} +
chmod 0755 "$root"
chmod -R a+rX "$root/usr"
{
    echo "dpdk: $(chroot "$root" dpkg-query -W -f='${Version}' librte-net-af-xdp25)"
    echo "size: $(du -sh --one-file-system "$root" | cut -f1)"
} >"$root/BUILD-INFO"
cat "$root/BUILD-INFO" >&2
mv "$root" "$dest"
