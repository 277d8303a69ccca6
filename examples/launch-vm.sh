#!/bin/sh
# Start a VM whose first NIC is QUEUES AF_XDP queues of IFNAME, as an unprivileged user.
#
#   usage: launch-vm.sh IFNAME QUEUES [QEMU ARGS...]    e.g. launch-vm.sh eth1 2 -drive file=vm.qcow2,if=virtio
#
# `xsk-broker request` asks the broker for the sockets, fills {netdev} with the whole
# af-xdp -netdev value (fd numbers, mode, queues, inhibit=on) and then becomes QEMU, so the
# lease lasts exactly as long as QEMU. The user needs: membership of group xsk-broker (to
# reach the broker's socket) and RLIMIT_MEMLOCK of QUEUES x 32 MiB (QEMU's UMEM per queue).
# QEMU runs in the network namespace of IFNAME. $QEMU picks another binary.
set -eu

[ $# -ge 2 ] || { echo "usage: $0 IFNAME QUEUES [QEMU ARGS...]" >&2; exit 2; }
ifname=$1
queues=$2
shift 2

exec xsk-broker request --ifname "$ifname" --queues "$queues" --tag "launch-vm-$ifname" -- \
    "${QEMU:-qemu-system-x86_64}" -machine q35 -m "${MEMORY:-1024}" -nodefaults -display none \
    -netdev '{netdev}' \
    -device "virtio-net-pci,netdev=net0,mq=on,vectors=$((2 * queues + 2))" \
    "$@"
