#!/bin/bash
# Build the tiny Linux guest that the VM tests and benchmarks boot under QEMU (TCG): Debian
# bookworm's kernel as an uncompressed ELF vmlinux (QEMU boots it through its PVH entry note,
# no firmware, no bootloader) plus an initramfs holding busybox-static, iperf3 with its shared
# libraries and loader, the virtio-net-over-PCI modules and an /init. The /init contract (the
# xskt.* kernel parameters and the XSKT-* console lines) is documented in lab/guest.py.
#
# Packages come from the host's apt sources with `apt-get download` and are unpacked with
# `dpkg-deb -x`; nothing is installed on the host. Needs: apt-get, dpkg-deb, xz (the kernel's
# compression), modinfo (kmod), od; readelf (binutils) is used for an extra check if present.
#
# usage: guest-image.sh DEST
# DEST must not exist; it is built under DEST.tmp-PID and renamed at the end, so a cache
# entry is either complete or absent. The result is world-readable: QEMU may run as nobody.
# Output: DEST/vmlinux, DEST/initrd.cpio (newc, uncompressed), DEST/versions.txt.
set -euo pipefail
umask 022

dest=${1:?usage: guest-image.sh DEST}
[ ! -e "$dest" ] || { echo "guest-image: $dest exists" >&2; exit 1; }
work=$dest.tmp-$$
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM HUP
mkdir -p "$work/debs" "$work/x" "$work/root" "$work/out"
work=$(cd "$work" && pwd)
x=$work/x root=$work/root out=$work/out

die() { echo "guest-image: $*" >&2; exit 1; }

# --- packages -------------------------------------------------------------------------------
# linux-image-amd64 is a metapackage; the kernel itself is the versioned package it depends on.
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1
}
pkg=$(kernel_pkg || true)  # no apt lists yet: apt-cache fails
if [ -z "$pkg" ]; then
    apt-get update -q >"$work/apt-update.log" 2>&1 || { cat "$work/apt-update.log" >&2; exit 1; }
    pkg=$(kernel_pkg)
    [ -n "$pkg" ] || die "cannot resolve linux-image-amd64"
fi
# iperf3's libraries: libiperf0 needs libssl3 (libcrypto) and libsctp1. The loader check
# below fails the build if Debian ever adds a dependency not listed here.
packages="$pkg busybox-static iperf3 libiperf0 libssl3 libsctp1 libc6"
download() {
    (cd "$work/debs" && apt-get -q -o APT::Sandbox::User=root download $packages) \
        >"$work/download.log" 2>&1
}
if ! download; then
    apt-get update -q >"$work/apt-update.log" 2>&1 || { cat "$work/apt-update.log" >&2; exit 1; }
    download || { cat "$work/download.log" >&2; exit 1; }
fi
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$x"
    dpkg-deb -f "$deb" Package Version | sed 's/^[^:]*: //' | paste -sd' ' >>"$out/versions.txt"
done

# --- kernel: decompress the vmlinux inside the bzImage ---------------------------------------
# Like the kernel's scripts/extract-vmlinux: for each compression magic, try every place it
# occurs and keep the first that decompresses to an ELF file.
is_elf() { [ "$(od -An -tx1 -N4 "$1" 2>/dev/null | tr -d ' ')" = 7f454c46 ]; }
bzimage=$(ls "$x"/boot/vmlinuz-*)
kver=${bzimage##*/vmlinuz-}
extract() {  # magic (printf octal escapes), a pattern not in the magic, decompressor...
    local magic=$1 fill=$2 pos
    shift 2
    for pos in $(tr "$magic\n$fill" "\n$fill=" <"$bzimage" | grep -abo "^$fill" || true); do
        pos=${pos%%:*}
        tail -c+"$pos" "$bzimage" | "$@" >"$work/vmlinux" 2>/dev/null || true
        is_elf "$work/vmlinux" && return 0
    done
    return 1
}
extract '\3757zXZ\000' abcde xz -dc --single-stream \
    || extract '\037\213\010' xy gzip -dc \
    || extract '\050\265\057\375' xxx zstd -dc \
    || extract '\002\041\114\030' xxx lz4 -dc \
    || extract '\135\000\000\000' xxx xz -dc --format=lzma \
    || extract 'BZh' xy bzip2 -dc \
    || die "no ELF vmlinux found inside $bzimage"
if command -v readelf >/dev/null; then
    # XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry point QEMU needs to boot an ELF kernel.
    readelf -n "$work/vmlinux" | grep -q 'Xen.*0x00000012' || die "vmlinux has no PVH note"
fi
mv "$work/vmlinux" "$out/vmlinux"

# --- initramfs -----------------------------------------------------------------------------
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc/xskt,lib/modules}
mkdir -p "$root/lib/x86_64-linux-gnu" "$root/lib64"
chmod 1777 "$root/tmp"
cp "$x/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
echo "127.0.0.1 localhost" >"$root/etc/hosts"

# iperf3 plus what the (staged) loader resolves for it, all of it from the staged packages.
cp "$x/usr/bin/iperf3" "$root/usr/bin/iperf3"
libdirs=$x/lib/x86_64-linux-gnu:$x/usr/lib/x86_64-linux-gnu
"$x/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --inhibit-cache --library-path "$libdirs" \
    --list "$x/usr/bin/iperf3" >"$work/libs.txt"
grep -q 'not found' "$work/libs.txt" && { cat "$work/libs.txt" >&2; die "iperf3: missing libs"; }
awk '$2 == "=>" { print $1, $3 }' "$work/libs.txt" | while read -r name path; do
    case $path in "$x"/*) ;; *) die "iperf3: $name resolved outside the packages: $path" ;; esac
    case $name in
        /*) cp -L "$path" "$root$name" ;;  # the loader, at its PT_INTERP path
        *) cp -L "$path" "$root/lib/x86_64-linux-gnu/$name" ;;
    esac
done
[ -e "$root/lib64/ld-linux-x86-64.so.2" ] || die "iperf3: no loader"

# Modules: virtio_pci and virtio_net plus what `modinfo -F depends` says, dependencies first.
moddir=$x/lib/modules/$kver
order=""
add_module() {
    local name=$1 ko dep
    case " $order " in *" $name "*) return 0 ;; esac
    ko=$(find "$moddir/kernel" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) | head -n1)
    if [ -z "$ko" ]; then
        grep -q "/\($name\|${name//_/-}\)\.ko\$" "$moddir/modules.builtin" \
            || die "module $name not found"
        return 0  # built in
    fi
    for dep in $(modinfo -F depends "$ko" | tr , ' '); do
        add_module "$dep"
    done
    cp "$ko" "$root/lib/modules/$name.ko"
    order="$order $name"
}
add_module virtio_pci
add_module virtio_net
echo $order | tr ' ' '\n' >"$root/etc/xskt/modules"

cat >"$root/init" <<'EOF'
#!/bin/sh
# xsk-broker test guest init; the contract is documented in lab/guest.py.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
hostname xskt

for m in $(cat /etc/xskt/modules); do
    insmod "/lib/modules/$m.ko" || echo "xskt-init: insmod $m failed"
done

read -r cmdline </proc/cmdline
param() {  # value of kernel parameter $1, status 1 if absent
    for word in $cmdline; do
        case $word in "$1="*) echo "${word#*=}"; return 0 ;; esac
    done
    return 1
}
ifaddr() {  # device, ADDR/PREFIX: waits up to 5 s for the device, then configures it
    tries=0
    while [ ! -e "/sys/class/net/$1" ] && [ $tries -lt 100 ]; do
        sleep 0.05; tries=$((tries + 1))
    done
    ip addr add "$2" dev "$1" && ip link set "$1" up || echo "xskt-init: cannot set up $1"
}

ip link set lo up
if addr=$(param xskt.ip); then ifaddr eth0 "$addr"; fi
if addr=$(param xskt.ip1); then ifaddr eth1 "$addr"; fi
echo XSKT-BOOTED

if script=$(param xskt.sh); then
    if echo "$script" | base64 -d >/tmp/xskt.sh; then
        cd /tmp && sh /tmp/xskt.sh
        rc=$?
    else
        echo "xskt-init: xskt.sh is not valid base64"
        rc=125
    fi
else
    echo XSKT-READY
    setsid cttyhack sh -l
    rc=$?
fi
cd /
echo "XSKT-EXIT $rc"
# Power off only once that line has left the UART: the last close of a tty waits for its
# output to drain, so end every other holder of the console first, then close ours.
kill -KILL -1 2>/dev/null
sleep 0.05
exec </dev/null >/dev/null 2>&1
poweroff -f
EOF
chmod 755 "$root/init"

# Uncompressed: under TCG the guest kernel takes about 0.5 s to gunzip it, QEMU none to load it.
(cd "$root" && find . | LC_ALL=C sort | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) \
    >"$out/initrd.cpio"
echo "kernel $kver; modules:$order" >>"$out/versions.txt"

chmod -R a+rX "$out"
mv "$out" "$dest"
