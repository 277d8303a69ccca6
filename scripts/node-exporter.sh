#!/bin/sh
# Unpack Debian 12's prometheus-node-exporter into DEST, for the metrics tests.
#
# The package is downloaded and unpacked, never installed: installing it would enable and
# start a node_exporter service on port 9100 of the host. The tests run DEST's binary by
# hand, on a loopback port of their own, and stop it.
#
# usage: node-exporter.sh DEST
# DEST must not exist; it is made under DEST.tmp-PID and renamed at the end, so a cache
# entry is complete or absent.
set -eu

dest=${1:?usage: node-exporter.sh DEST}
[ ! -e "$dest" ] || { echo "node-exporter: $dest exists" >&2; exit 1; }
umask 022
work=$dest.tmp-$$
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM
mkdir -p "$work/deb"
# apt-get download writes to the current directory; _apt cannot write there, hence -o.
fetch() {
    (cd "$work/deb" && apt-get download -q -o APT::Sandbox::User=root prometheus-node-exporter)
}
fetch || { apt-get update -q && fetch; }
dpkg-deb -x "$work"/deb/prometheus-node-exporter_*.deb "$work/root"
"$work/root/usr/bin/prometheus-node-exporter" --version >"$work/version" 2>&1
rm -rf "$work/deb"
mv "$work" "$dest"
trap - EXIT
