"""The XSK redirect program: its instructions, and loading them for its two maps.

libxdp's default program redirects through one XSKMAP indexed by rx queue. This one looks
the queue up in an ARRAY_OF_MAPS first and redirects through the XSKMAP found there, so
a queue can be steered into a map of its own: a map lease's, which its consumer may fill
as it likes without reaching any other queue (docs/security.md). A queue whose slot is
empty redirects through the interface's shared map (socket leases, whose sockets the
broker inserts itself), so attaching writes no slot: every write to an ARRAY_OF_MAPS
waits out an RCU grace period (7-16 ms here), which the first request on an interface
paid. Fifteen hand-written instructions the verifier accepts on 6.18, so the broker needs
no compiler, object file or BTF.
"""

from __future__ import annotations

import struct

from broker import bpf

NAME = "xsk_redirect"
XDP_PASS = 2
BPF_FUNC_MAP_LOOKUP_ELEM = 1
BPF_FUNC_REDIRECT_MAP = 51
_INSN = struct.Struct("<BBhi")  # opcode, dst_reg | src_reg << 4, offset, immediate


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, dst | src << 4, off, imm)


def instructions(outer_fd: int, shared_fd: int) -> bytes:
    """```
    __u32 queue = ctx->rx_queue_index;
    void *xsks = bpf_map_lookup_elem(&queue_maps, &queue);
    if (!xsks)
        xsks = &shared_xsks;
    return bpf_redirect_map(xsks, queue, XDP_PASS);
    ```"""
    return b"".join(
        (
            _insn(0x61, dst=2, src=1, off=16),  # r2 = ctx->rx_queue_index
            _insn(0x63, dst=10, src=2, off=-4),  # *(u32 *)(fp - 4) = r2
            _insn(0x18, dst=1, src=1, imm=outer_fd),  # r1 = &queue_maps (BPF_PSEUDO_MAP_FD)
            _insn(0x00),  # the second half of the 64-bit immediate load
            _insn(0xBF, dst=2, src=10),  # r2 = fp
            _insn(0x07, dst=2, imm=-4),  # r2 = fp - 4 (&queue)
            _insn(0x85, imm=BPF_FUNC_MAP_LOOKUP_ELEM),  # r0 = the queue's XSKMAP or NULL
            _insn(0x55, dst=0, off=2),  # if r0 != NULL goto redirect
            _insn(0x18, dst=0, src=1, imm=shared_fd),  # r0 = &shared_xsks
            _insn(0x00),
            _insn(0xBF, dst=1, src=0),  # redirect: r1 = the XSKMAP
            _insn(0x61, dst=2, src=10, off=-4),  # r2 = queue
            _insn(0xB7, dst=3, imm=XDP_PASS),  # r3 = XDP_PASS when no socket is in the slot
            _insn(0x85, imm=BPF_FUNC_REDIRECT_MAP),  # r0 = bpf_redirect_map(r1, r2, r3)
            _insn(0x95),  # exit
        )
    )


def load(outer_fd: int, shared_fd: int) -> int:
    """The program loaded for the map of XSKMAPs outer_fd, falling back to the XSKMAP
    shared_fd; the caller owns the returned fd."""
    return bpf.load_xdp_program(NAME, instructions(outer_fd, shared_fd))
