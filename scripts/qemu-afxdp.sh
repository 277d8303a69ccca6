#!/bin/sh
# Build a QEMU with the af-xdp netdev backend into a Debian trixie rootfs, for the tests.
#
# No Debian QEMU has af-xdp (none depends on libxdp), and QEMU >= 8.2 needs libxdp >= 1.4,
# which only trixie has (and trixie's libxdp needs trixie's libc). So: debootstrap a minbase
# trixie, build trixie's own `qemu` source package there against trixie's libxdp-dev and
# libbpf-dev with a minimal feature set, install it under /opt/qemu in that rootfs, and add
# trixie's firmware packages. The build tools are purged afterwards; what stays is the
# rootfs's runtime libraries, its ld.so, QEMU and the firmware. The tests run it from the
# host's view through the rootfs's ld.so (lab/qemu.py), no chroot.
#
# bookworm's debootstrap (1.0.128+nmu2+deb12u2) knows trixie, and debian-archive-keyring
# 2023.3+deb12u1 and later carry the trixie archive keys, so plain Debian 12 tooling does.
#
# usage: qemu-afxdp.sh DEST
# DEST must not exist; it is built under DEST.tmp-PID and renamed at the end, so a cache
# entry is either complete or absent. Every step that mounts something (debootstrap, each
# chroot step) runs in its own private mount and PID namespace: its mounts vanish with it,
# and when it is killed everything it started dies too. The exit trap still unmounts
# anything found mounted below the temp dir before removing it (never crossing into another
# file system), and prints the last 30 lines of the log on failure.
set -eu

dest=${1:?usage: qemu-afxdp.sh DEST}
[ ! -e "$dest" ] || { echo "qemu-afxdp: $dest exists" >&2; exit 1; }
umask 022
mirror=$(sh "$(dirname "$0")/debian-mirror.sh")
suite=trixie
prefix=/opt/qemu
work=$dest.tmp-$$
root=$work/root
log=$work/build.log

# Build dependencies: the compiler, QEMU's build system (meson, ninja, python3-venv for its
# pyvenv), dpkg-dev for `apt-get source`, and the libraries of the enabled features.
build_deps="dpkg-dev gcc libc6-dev pkgconf python3 python3-venv meson ninja-build
    libglib2.0-dev zlib1g-dev libpixman-1-dev libslirp-dev libxdp-dev libbpf-dev"
# Firmware, all from trixie: seabios (/usr/share/seabios), ipxe-qemu (/usr/share/qemu/*.rom,
# the virtio-net-pci boot ROM), and qemu-system-data (/usr/share/qemu: the x86 option ROMs
# for -kernel such as pvh.bin and linuxboot_dma.bin, built from this same source package;
# building them here would need a 32-bit libgcc).
firmware="seabios ipxe-qemu qemu-system-data"
# --disable-download: never fetch meson subprojects (libfdt is not needed by x86_64 and
# would otherwise be cloned with git). --disable-install-blobs: Debian's source has the
# prebuilt firmware removed (it comes from the packages above).
configure_flags="--prefix=$prefix --target-list=x86_64-softmmu --without-default-features
    --enable-tcg --enable-kvm --enable-af-xdp --enable-bpf --enable-slirp --enable-pixman
    --disable-docs --disable-werror --disable-download --disable-install-blobs"

name=qemu-afxdp
. "$(dirname "$0")/build-work.sh"

say() {
    echo "qemu-afxdp: $*" >&2
    echo "=== $*" >>"$log"
}

# Run "$@" in a fresh private mount + PID namespace: whatever it mounts is gone when it
# ends, and if this script is killed (SIGKILL included) everything below it is killed.
isolated() {
    unshare --mount --propagation private --pid --fork --kill-child "$@"
}

# Run "$@" chrooted into the rootfs with /proc (of the new PID namespace), /sys and /dev.
in_root() {
    isolated --mount-proc="$root/proc" sh -c '
        root=$1; shift
        mount -t sysfs sysfs "$root/sys"
        mount --rbind /dev "$root/dev"
        exec chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            DEBIAN_FRONTEND=noninteractive "$@"
    ' sh "$root" "$@" >>"$log" 2>&1
}

elapsed() {
    echo $(($(date +%s) - $1))
}

started=$(date +%s)

if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap on the host"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends debootstrap; } >>"$log" 2>&1
fi

say "debootstrap $suite (minbase) from $mirror"
t=$(date +%s)
isolated debootstrap --variant=minbase "$suite" "$root" "$mirror" >>"$log" 2>&1
t_debootstrap=$(elapsed "$t")

cp -L /etc/resolv.conf "$root/etc/resolv.conf"
echo "deb-src $mirror $suite main" >>"$root/etc/apt/sources.list"
cat >"$root/etc/apt/apt.conf.d/90xskt" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Get::Assume-Yes "true";
EOF
cat >"$root/etc/dpkg/dpkg.cfg.d/90xskt" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
EOF

say "installing build dependencies and firmware, fetching the qemu source"
t=$(date +%s)
in_root apt-get -q update
# shellcheck disable=SC2086 # word splitting of the package lists is intended
in_root apt-get -q -y install $build_deps $firmware
in_root sh -c 'mkdir /build && cd /build && apt-get -q -o APT::Sandbox::User=root source qemu'
t_deps=$(elapsed "$t")

say "building qemu"
t=$(date +%s)
# shellcheck disable=SC2016 # expanded inside the chroot
in_root sh -c '
    set -eu
    cd /build/qemu-*/
    mkdir -p "$2"
    head -n 1 debian/changelog >"$2/SOURCE"
    mkdir build && cd build
    ../configure $1
    ninja -j"$(nproc)" qemu-system-x86_64 trace/trace-events-all
    ./pyvenv/bin/meson install --no-rebuild --strip --quiet
' sh "$configure_flags" "$prefix"
t_compile=$(elapsed "$t")

say "checking the result and removing the build tools"
t=$(date +%s)
# Keep the packages of every library QEMU links against, purge the rest of the build.
# shellcheck disable=SC2016,SC2086
in_root sh -c '
    set -eu
    prefix=$1
    shift
    qemu=$prefix/bin/qemu-system-x86_64
    if ldd "$qemu" | grep "not found"; then exit 1; fi
    "$qemu" -netdev help | grep -qx af-xdp
    for lib in $(ldd "$qemu" | awk "/=> \\// { print \$3 }"); do
        dpkg-query -S "*/$(basename "$(readlink -f "$lib")")"
    done | cut -d: -f1 | sort -u | xargs apt-mark manual
    apt-get -q -y purge --autoremove "$@"
    if ldd "$qemu" | grep "not found"; then exit 1; fi
    "$qemu" -netdev help | grep -qx af-xdp
    dpkg-query -W -f="\${Package} \${Version}\n" >"$prefix/PACKAGES"
    apt-get clean
    rm -rf /build /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /tmp/* /root/.cache
' sh "$prefix" $build_deps
t_cleanup=$(elapsed "$t")

# Unprivileged uids run this QEMU and read its libraries and firmware from the host's view.
# Nothing here needs privilege, and every uid can reach this tree: no setuid or setgid
# binaries, no world-writable directories.
find "$root" -xdev -type f -perm /6000 -exec chmod ug-s {} +
find "$root" -xdev -type d -perm -0002 -exec chmod o-w,-t {} +
chmod 0755 "$root"
find "$root" -type d ! -perm -0555 -exec chmod a+rx {} +
chmod -R a+rX "$root/usr" "$root/opt"
rm -f "$root/etc/resolv.conf"

t_total=$(elapsed "$started")
{
    echo "qemu: $("$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
        --library-path "$root/usr/lib/x86_64-linux-gnu" \
        "$root$prefix/bin/qemu-system-x86_64" --version | head -n 1)"
    echo "source: $(cat "$root$prefix/SOURCE")"
    echo "seconds: debootstrap=$t_debootstrap deps=$t_deps compile=$t_compile" \
        "cleanup=$t_cleanup total=$t_total"
    echo "size: $(du -sh --one-file-system "$root" | cut -f1)"
} >"$root$prefix/BUILD-INFO"
cat "$root$prefix/BUILD-INFO" >&2

mv "$root" "$dest"
