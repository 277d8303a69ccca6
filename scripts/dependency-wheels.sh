#!/bin/sh
# Wheels of xsk-broker's runtime dependencies, for the test that installs the project's own
# wheel into a clean venv with pip --no-index: the network is used once, here, and the
# install test runs offline from this cache entry.
#
# usage: dependency-wheels.sh DEST PYTHON REQUIREMENT...
# PYTHON builds the wheels (systemd-python and python-prctl compile against libsystemd-dev
# and libcap-dev, which scripts/setup.sh installs). DEST must not exist; it is made under
# DEST.tmp-PID and renamed at the end, so a cache entry is complete or absent.
set -eu

dest=${1:?usage: dependency-wheels.sh DEST PYTHON REQUIREMENT...}
python=${2:?usage: dependency-wheels.sh DEST PYTHON REQUIREMENT...}
shift 2
[ ! -e "$dest" ] || { echo "dependency-wheels: $dest exists" >&2; exit 1; }
umask 022
work=$dest.tmp-$$
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM
mkdir -p "$work"
"$python" -m pip wheel -q --disable-pip-version-check --wheel-dir "$work" "$@"
mv "$work" "$dest"
trap - EXIT
