"""The XSK redirect program: its instructions, and loading them for one XSKMAP.

Equivalent of libxdp's default program, in the six instructions the verifier accepts
("processed 5 insns"), so the broker needs no compiler, object file or BTF.
"""

from __future__ import annotations

import struct

from broker import bpf

NAME = "xsk_redirect"
XDP_PASS = 2
BPF_FUNC_REDIRECT_MAP = 51
_INSN = struct.Struct("<BBhi")  # opcode, dst_reg | src_reg << 4, offset, immediate


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, dst | src << 4, off, imm)


def instructions(map_fd: int) -> bytes:
    """`return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);`"""
    return b"".join(
        (
            _insn(0x61, dst=2, src=1, off=16),  # r2 = ctx->rx_queue_index
            _insn(0x18, dst=1, src=1, imm=map_fd),  # r1 = &xsks_map (BPF_PSEUDO_MAP_FD)
            _insn(0x00),  # the second half of the 64-bit immediate load
            _insn(0xB7, dst=3, imm=XDP_PASS),  # r3 = XDP_PASS when the slot is empty
            _insn(0x85, imm=BPF_FUNC_REDIRECT_MAP),  # call bpf_redirect_map
            _insn(0x95),  # exit
        )
    )


def load(map_fd: int) -> int:
    """The program loaded for map_fd; the caller owns the returned fd."""
    return bpf.load_xdp_program(NAME, instructions(map_fd))
