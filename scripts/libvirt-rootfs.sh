#!/bin/sh
# Build the rootfs the libvirt container tests boot: a copy of the base container rootfs
# (scripts/container-rootfs.sh, left as it is) plus Debian 12's libvirt-daemon-system
# (libvirt 9.0), Debian's own QEMU 7.2 (which has no af-xdp backend) and setcap, and
# libvirt's Python binding in the rootfs venv, built on the host against the same
# libvirt-dev (Debian 12's libvirt 9.0, as in the rootfs).
#
# usage: libvirt-rootfs.sh DEST BASE HOST_PYTHON REQUIREMENT...
# DEST must not exist; it is built under DEST.tmp-PID and renamed at the end, so a cache
# entry is either complete or absent. apt runs inside with the host's network.
set -eu

dest=$1
base=$2
python=$3
shift 3
[ ! -e "$dest" ] || { echo "libvirt-rootfs: $dest exists" >&2; exit 1; }
work=$dest.tmp-$$
trap 'rm -rf "$work"' EXIT INT TERM
mkdir -p "$work"
cp -a "$base" "$work/root"

"$python" -m pip wheel --quiet --use-pep517 --wheel-dir "$work/wheels" "$@"

nspawn() {
    systemd-nspawn --quiet --register=no --keep-unit --machine=xskt-build-libvirt \
        --directory="$work/root" --bind-ro="$work/wheels:/tmp/wheels" "$@"
}
nspawn sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends libvirt-daemon-system libvirt-clients qemu-system-x86 \
    libcap2-bin procps && apt-get clean' >"$work/apt.log" 2>&1 \
    || { tail -20 "$work/apt.log" >&2; exit 1; }
nspawn /opt/xsk-broker/bin/pip install --quiet --no-index --find-links=/tmp/wheels \
    --no-warn-script-location "$@"

mv "$work/root" "$dest"
