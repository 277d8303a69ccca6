#!/bin/sh
# Build the Debian rootfs the container tests boot: debootstrap bookworm, then a venv at
# /opt/xsk-broker holding the project's runtime dependencies, installed from wheels built on
# the host (the container has no network). The project source itself is not installed: the
# harness binds the checkout at /opt/xsk-broker-src, which the venv sees through a .pth file.
#
# usage: container-rootfs.sh DEST HOST_PYTHON REQUIREMENT...
# DEST must not exist; it is built under DEST.tmp-PID and renamed at the end, so a cache
# entry is either complete or absent.
set -eu

dest=$1
python=$2
shift 2
[ ! -e "$dest" ] || { echo "container-rootfs: $dest exists" >&2; exit 1; }
work=$dest.tmp-$$
trap 'rm -rf "$work"' EXIT INT TERM
mkdir -p "$work"

debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,python3-venv,libbpf1,iproute2 \
    bookworm "$work/root" "$(sh "$(dirname "$0")/debian-mirror.sh")" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

"$python" -m pip wheel --quiet --use-pep517 --wheel-dir "$work/wheels" "$@"

nspawn() {
    systemd-nspawn --quiet --register=no --keep-unit --private-network --machine=xskt-build \
        --directory="$work/root" --bind-ro="$work/wheels:/tmp/wheels" "$@"
}
nspawn python3 -m venv /opt/xsk-broker
nspawn /opt/xsk-broker/bin/pip install --quiet --no-index --find-links=/tmp/wheels \
    --no-warn-script-location "$@"
for site in "$work"/root/opt/xsk-broker/lib/python3*/site-packages; do
    echo /opt/xsk-broker-src >"$site/xsk-broker-src.pth"
done
mkdir -p "$work/root/opt/xsk-broker-src"

# Boot to the console quickly and quietly; nothing in the tests needs a getty or a login.
ln -sf /dev/null "$work/root/etc/systemd/system/console-getty.service"
ln -sf /dev/null "$work/root/etc/systemd/system/getty@.service"
echo xskt >"$work/root/etc/hostname"

mv "$work/root" "$dest"
