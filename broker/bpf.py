"""libbpf.so.1 through ctypes: maps, programs, links and pins. Nothing else.

Every call returns an fd the caller owns, or raises BpfError carrying the kernel's errno.
libbpf >= 1.0 returns -errno directly, so no errno global is consulted.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import struct
from typing import NamedTuple

BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_XSKMAP = 17
BPF_PROG_TYPE_XDP = 6
BPF_XDP = 37  # enum bpf_attach_type
BPF_ANY = 0
BPF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
_VERIFIER_LOG_BYTES = 64 * 1024


class BpfError(OSError):
    """A libbpf call failed; errno is the kernel's."""


class _ProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts as of libbpf 1.1 (sz tells newer libbpf what we know)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_int),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_char_p),
    )


class _MapCreateOpts(ctypes.Structure):
    """struct bpf_map_create_opts as of libbpf 1.1."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    )


class _LinkCreateOpts(ctypes.Structure):
    """The head of struct bpf_link_create_opts: XDP only needs flags."""

    _fields_ = (("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32))


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise BpfError(
            errno_mod.ENOENT, f"libbpf.so.1 is not installed ({exc}); install Debian's libbpf1"
        ) from None
    vp, c_int, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    signatures = {
        "bpf_map_create": ([c_int, ctypes.c_char_p, u32, u32, u32, vp], c_int),
        "bpf_prog_load": (
            [c_int, ctypes.c_char_p, ctypes.c_char_p, vp, ctypes.c_size_t, vp],
            c_int,
        ),
        "bpf_link_create": ([c_int, c_int, c_int, vp], c_int),
        "bpf_link_detach": ([c_int], c_int),
        "bpf_obj_pin": ([c_int, ctypes.c_char_p], c_int),
        "bpf_obj_get": ([ctypes.c_char_p], c_int),
        "bpf_map_update_elem": ([c_int, vp, vp, ctypes.c_uint64], c_int),
        "bpf_map_delete_elem": ([c_int, vp], c_int),
        "bpf_map_lookup_elem": ([c_int, vp, vp], c_int),
        "bpf_map_update_batch": ([c_int, vp, vp, ctypes.POINTER(u32), vp], c_int),
        "bpf_obj_get_info_by_fd": ([c_int, vp, ctypes.POINTER(u32)], c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        func = getattr(lib, name)
        func.argtypes, func.restype = argtypes, restype
    return lib


_lib: ctypes.CDLL | None = None


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def _check(result: int, what: str) -> int:
    if result < 0:
        raise BpfError(-result, f"{what}: {os.strerror(-result)}")
    return result


def create_xskmap(name: str, max_entries: int) -> int:
    """An XSKMAP with one slot per rx queue; needs CAP_BPF and CAP_NET_ADMIN."""
    fd = _libbpf().bpf_map_create(BPF_MAP_TYPE_XSKMAP, name.encode()[:15], 4, 4, max_entries, None)
    return _check(fd, f"creating an XSKMAP with {max_entries} entries")


def create_map_of_maps(name: str, inner_fd: int, max_entries: int) -> int:
    """An ARRAY_OF_MAPS whose values are maps shaped like inner_fd (an XSKMAP here)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), inner_map_fd=inner_fd)
    fd = _libbpf().bpf_map_create(
        BPF_MAP_TYPE_ARRAY_OF_MAPS, name.encode()[:15], 4, 4, max_entries, ctypes.byref(opts)
    )
    return _check(fd, f"creating an array of {max_entries} maps")


def load_xdp_program(name: str, instructions: bytes, license_: str = "GPL") -> int:
    """Load an XDP program; a verifier refusal carries the verifier's log in the message."""
    log = ctypes.create_string_buffer(_VERIFIER_LOG_BYTES)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), log_level=1, log_size=len(log))
    opts.log_buf = ctypes.cast(log, ctypes.c_char_p)
    insns = ctypes.create_string_buffer(instructions, len(instructions))
    fd: int = _libbpf().bpf_prog_load(
        BPF_PROG_TYPE_XDP,
        name.encode()[:15],
        license_.encode(),
        insns,
        len(instructions) // 8,
        ctypes.byref(opts),
    )
    if fd < 0:
        verifier = log.value.decode(errors="replace").strip()
        raise BpfError(-fd, f"loading XDP program {name}: {os.strerror(-fd)}; verifier: {verifier}")
    return fd


def create_xdp_link(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach prog_fd to ifindex through a bpf_link (netlink cannot replace it)."""
    opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=flags)
    fd = _libbpf().bpf_link_create(prog_fd, ifindex, BPF_XDP, ctypes.byref(opts))
    return _check(fd, f"attaching XDP program to ifindex {ifindex} (flags {flags:#x})")


def detach_link(link_fd: int) -> None:
    """Detach a link from its device now, even while pins or other fds still hold it."""
    _check(_libbpf().bpf_link_detach(link_fd), "detaching the XDP link")


def pin(fd: int, path: str) -> None:
    _check(_libbpf().bpf_obj_pin(fd, path.encode()), f"pinning to {path}")


def get_pinned(path: str) -> int:
    return _check(_libbpf().bpf_obj_get(path.encode()), f"opening pin {path}")


def map_update(map_fd: int, key: int, value: int, flags: int) -> None:
    k, v = ctypes.c_uint32(key), ctypes.c_uint32(value)
    result = _libbpf().bpf_map_update_elem(map_fd, ctypes.byref(k), ctypes.byref(v), flags)
    _check(result, f"setting map slot {key}")


def map_fill(map_fd: int, keys: list[int], value: int) -> None:
    """Set every slot in keys to value in one BPF_MAP_UPDATE_BATCH. For a map of maps
    the kernel waits out an RCU grace period per update call (about 10 ms here), so a
    64-queue interface took 640 ms slot by slot; a batch waits once."""
    if not keys:
        return
    count = ctypes.c_uint32(len(keys))
    k = (ctypes.c_uint32 * len(keys))(*keys)
    v = (ctypes.c_uint32 * len(keys))(*([value] * len(keys)))
    _check(
        _libbpf().bpf_map_update_batch(map_fd, k, v, ctypes.byref(count), None),
        f"setting map slots {keys[0]}..{keys[-1]}",
    )


def inner_map_id(map_fd: int, key: int) -> int | None:
    """The id of the map in slot key of a map of maps (user space reads ids, not fds);
    None when the slot is empty."""
    k, v = ctypes.c_uint32(key), ctypes.c_uint32()
    result = _libbpf().bpf_map_lookup_elem(map_fd, ctypes.byref(k), ctypes.byref(v))
    if result == -errno_mod.ENOENT:
        return None
    _check(result, f"reading map slot {key}")
    return v.value


def map_delete(map_fd: int, key: int) -> None:
    k = ctypes.c_uint32(key)
    _check(_libbpf().bpf_map_delete_elem(map_fd, ctypes.byref(k)), f"clearing map slot {key}")


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    _check(_libbpf().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(length)), "reading object info")
    return buf.raw


class LinkInfo(NamedTuple):
    """A link's identity; ifindex 0 means its device went away and it is detached.

    NamedTuple rather than a frozen dataclass, as for the other records read at start-up:
    a frozen dataclass costs ~0.5 ms to define on this VM, a NamedTuple ~0.1 ms.
    """

    link_id: int
    prog_id: int
    ifindex: int


class MapInfo(NamedTuple):
    """The fields of struct bpf_map_info that adoption checks."""

    map_id: int
    map_type: int
    max_entries: int


def link_info(link_fd: int) -> LinkInfo:
    # struct bpf_link_info: type, id, prog_id, then a union aligned to 8 whose xdp member
    # starts with ifindex.
    _type, link_id, prog_id, _pad, ifindex = struct.unpack_from("=IIIII", _info(link_fd, 64))
    return LinkInfo(link_id, prog_id, ifindex)


def map_info(map_fd: int) -> MapInfo:
    # struct bpf_map_info: type, id, key_size, value_size, max_entries, ...
    map_type, map_id, _k, _v, max_entries = struct.unpack_from("=IIIII", _info(map_fd, 80))
    return MapInfo(map_id, map_type, max_entries)
