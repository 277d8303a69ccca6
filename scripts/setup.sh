#!/usr/bin/env bash
# Installs what xsk-broker needs on a fresh Debian 12 machine, as root; only what is missing.
# The venv uses Debian's /usr/bin/python3 so that unprivileged test users (and the systemd
# test container, which runs Debian's Python) can execute it.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  python3 python3-venv python3-dev gcc pkg-config libcap-dev libsystemd-dev libbpf1
  iproute2 util-linux kmod systemd systemd-container debootstrap dbus-daemon polkitd
  qemu-system-x86 dnsmasq-base ethtool iperf3 xz-utils strace libvirt-dev
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "setup: building .venv" >&2
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,libvirt]'
  # The editable install records this checkout's absolute path, which other uids cannot
  # reach when the checkout lies under a closed directory. A path relative to
  # site-packages finds the checkout through whichever path the venv was reached by
  # (scripts/public-view.sh), and comes first on sys.path.
  # The editable install's own import hook then has nothing left to do but cost: it
  # added ~25 ms to every interpreter start (venv `python -c pass`: 50 ms against 22 ms),
  # which socket activation's first reply waits for. Its dist-info stays (the version,
  # the console script).
  for site in .venv/lib/python3*/site-packages; do
    echo ../../../.. >"$site/00-xsk-broker-checkout.pth"
    rm -f "$site"/__editable__*xsk_broker*
  done
  touch "$stamp"
fi
