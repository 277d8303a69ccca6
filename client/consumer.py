"""A small pure-Python AF_XDP consumer that does with a received socket what QEMU does.

It registers a UMEM on the fd, sets up the fill, completion, rx and tx rings, binds with
XDP_USE_NEED_WAKEUP (and XDP_COPY), then receives and sends frames. Stdlib and ctypes only,
and no capabilities: the socket arrives already created (that needed CAP_NET_RAW), and the
UMEM is charged to the caller's RLIMIT_MEMLOCK, which is why the defaults are small (256
frames of 4096 bytes, 1 MiB) rather than QEMU's 32 MiB.

Ring indexes are read and written through ctypes views of the shared mappings. That relies
on aligned 32-bit accesses being atomic and on x86-64 ordering stores after stores and loads
after loads (TSO), which is what the project runs on; other architectures would need
explicit barriers.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import select
import socket
import time
from collections.abc import Iterable
from typing import Generic, TypeVar

AF_XDP = 44
FRAME_SIZE = 4096
SOL_XDP = 283

XDP_MMAP_OFFSETS = 1
XDP_RX_RING = 2
XDP_TX_RING = 3
XDP_UMEM_REG = 4
XDP_UMEM_FILL_RING = 5
XDP_UMEM_COMPLETION_RING = 6
XDP_STATISTICS = 7

XDP_COPY = 1 << 1
XDP_USE_NEED_WAKEUP = 1 << 3
XDP_RING_NEED_WAKEUP = 1 << 0

XDP_PGOFF_RX_RING = 0
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000

# Local experimental ethertype (IEEE 802): the kernel stack ignores such frames.
ETH_P_EXPERIMENTAL = 0x88B5
_U32 = 0xFFFFFFFF
_IDLE_SLEEP = 0.0005

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_uint32,
]
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_libc.bind.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_libc.sendto.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_uint32,
]
_libc.sendto.restype = ctypes.c_ssize_t


class _UmemReg(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("chunk_size", ctypes.c_uint32),
        ("headroom", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("tx_metadata_len", ctypes.c_uint32),
    ]


class _RingOffset(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("producer", "consumer", "desc", "flags")]


class _MmapOffsets(ctypes.Structure):
    _fields_ = [(name, _RingOffset) for name in ("rx", "tx", "fr", "cr")]


class _Desc(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint32), ("options", ctypes.c_uint32)]


class _SockaddrXdp(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("queue_id", ctypes.c_uint32),
        ("shared_umem_fd", ctypes.c_uint32),
    ]


STAT_NAMES = (
    "rx_dropped",
    "rx_invalid_descs",
    "tx_invalid_descs",
    "rx_ring_full",
    "rx_fill_ring_empty_descs",
    "tx_ring_empty_descs",
)


class _Statistics(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in STAT_NAMES]


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _error(step: str, fd: int, err: int, hints: dict[int, str]) -> OSError:
    """An OSError carrying the kernel errno, naming the step and what to do about it."""
    name = errno.errorcode.get(err, str(err))
    return OSError(err, f"{step} on fd {fd} failed: {name} ({hints.get(err, os.strerror(err))})")


def _check(ret: int, step: str, fd: int, hints: dict[int, str] | None = None) -> None:
    if ret < 0:
        raise _error(step, fd, ctypes.get_errno(), hints or {})


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# A ring's entry: a UMEM address (fill and completion rings) or a descriptor (rx and tx).
_Entry = TypeVar("_Entry", ctypes.c_uint64, _Desc)


class _Ring(Generic[_Entry]):
    """One mmapped ring: the shared producer/consumer indexes, flags and entries."""

    def __init__(
        self,
        fd: int,
        size: int,
        entry: type[_Entry],
        offsets: _RingOffset,
        pgoff: int,
        name: str,
    ) -> None:
        length = offsets.desc + size * ctypes.sizeof(entry)
        try:
            self._map = mmap.mmap(
                fd,
                length,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=pgoff,
            )
        except OSError as exc:
            raise _error(f"mmap of the {name} ring", fd, exc.errno or errno.EIO, {}) from None
        self.size = size
        self.mask = size - 1
        self._producer = ctypes.c_uint32.from_buffer(self._map, offsets.producer)
        self._consumer = ctypes.c_uint32.from_buffer(self._map, offsets.consumer)
        self._flags = ctypes.c_uint32.from_buffer(self._map, offsets.flags)
        self.entries: ctypes.Array[_Entry] = (entry * size).from_buffer(self._map, offsets.desc)

    @property
    def needs_wakeup(self) -> bool:
        return bool(self._flags.value & XDP_RING_NEED_WAKEUP)

    def filled(self) -> int:
        """Entries produced and not yet consumed."""
        return (self._producer.value - self._consumer.value) & _U32

    def free(self) -> int:
        return self.size - self.filled()

    @property
    def producer(self) -> int:
        return self._producer.value

    @property
    def consumer(self) -> int:
        return self._consumer.value

    def produce(self, count: int) -> None:
        """Publish count entries written after the current producer index."""
        self._producer.value = (self._producer.value + count) & _U32

    def consume(self, count: int) -> None:
        """Hand count read entries back to the kernel."""
        self._consumer.value = (self._consumer.value + count) & _U32

    def close(self) -> None:
        del self._producer, self._consumer, self._flags, self.entries
        self._map.close()


_RingT = TypeVar("_RingT", _Ring[ctypes.c_uint64], _Ring[_Desc])


class XskSocket:
    """A bound AF_XDP socket with its own UMEM, set up the way QEMU sets up a lease's fd.

    Works on a dup of fd, so the caller keeps owning fd and closes it as usual; the kernel
    socket lives until both copies are closed. Half the frames feed the fill ring (capped at
    its size), the rest are for transmit. copy=True binds with XDP_COPY (QEMU force-copy=on);
    copy=False lets the kernel try zero-copy first. Every failing step raises OSError with
    the kernel errno and what to do about it; the socket is then spent (a UMEM is
    single-use), so ask the broker for a new one.
    """

    def __init__(
        self,
        fd: int,
        ifindex: int,
        queue_id: int,
        *,
        frames: int = 256,
        frame_size: int = FRAME_SIZE,
        ring_size: int = 128,
        copy: bool = True,
    ) -> None:
        if frames < 2:
            raise ValueError(f"frames must be at least 2 (one rx, one tx), got {frames}")
        if not _is_power_of_two(frame_size) or not 2048 <= frame_size <= mmap.PAGESIZE:
            raise ValueError(
                f"frame_size must be a power of two in 2048..{mmap.PAGESIZE}, got {frame_size}"
            )
        if not _is_power_of_two(ring_size):
            raise ValueError(f"ring_size must be a power of two, got {ring_size}")
        self.ifindex = ifindex
        self.queue_id = queue_id
        self.frame_size = frame_size
        self.copy = copy
        self.umem_bytes = frames * frame_size
        self._rings: list[_Ring[ctypes.c_uint64] | _Ring[_Desc]] = []
        self._umem = mmap.mmap(-1, self.umem_bytes, flags=mmap.MAP_PRIVATE)
        self._fd = os.dup(fd)
        try:
            self._setup(ring_size)
        except BaseException:
            self.close()
            raise
        rx_frames = min(frames // 2, ring_size)
        addrs = [i * frame_size for i in range(frames)]
        self._free_tx = addrs[rx_frames:]
        self._tx_outstanding = 0
        self._fill(addrs[:rx_frames])

    def _setup(self, ring_size: int) -> None:
        fd = self._fd
        reg = _UmemReg(
            addr=ctypes.addressof(ctypes.c_char.from_buffer(self._umem)),
            len=self.umem_bytes,
            chunk_size=self.frame_size,
        )
        memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        limit = "unlimited" if memlock == resource.RLIM_INFINITY else _mib(memlock)
        self._setsockopt(
            XDP_UMEM_REG,
            reg,
            "XDP_UMEM_REG",
            {
                errno.ENOBUFS: f"RLIMIT_MEMLOCK {limit}, summed over this uid's processes, is "
                f"too low for a {_mib(self.umem_bytes)} UMEM: raise LimitMEMLOCK= or use fewer "
                "frames",
                errno.EBUSY: "a UMEM is already registered on this socket; sockets are "
                "single-use, ask the broker for a new one",
                errno.EINVAL: "the kernel rejected the UMEM geometry",
            },
        )
        size = ctypes.c_uint32(ring_size)
        for opt, name in (
            (XDP_UMEM_FILL_RING, "XDP_UMEM_FILL_RING"),
            (XDP_UMEM_COMPLETION_RING, "XDP_UMEM_COMPLETION_RING"),
            (XDP_RX_RING, "XDP_RX_RING"),
            (XDP_TX_RING, "XDP_TX_RING"),
        ):
            self._setsockopt(
                opt,
                size,
                f"{name} size {ring_size}",
                {
                    errno.EBUSY: "the ring is already set up; the socket was used before",
                },
            )
        off = _MmapOffsets()
        optlen = ctypes.c_uint32(ctypes.sizeof(off))
        ret = _libc.getsockopt(fd, SOL_XDP, XDP_MMAP_OFFSETS, ctypes.byref(off), optlen)
        _check(ret, "getsockopt XDP_MMAP_OFFSETS", fd)
        u64, desc = ctypes.c_uint64, _Desc
        self._fq = self._ring(_Ring(fd, ring_size, u64, off.fr, XDP_UMEM_PGOFF_FILL_RING, "fill"))
        self._cq = self._ring(
            _Ring(fd, ring_size, u64, off.cr, XDP_UMEM_PGOFF_COMPLETION_RING, "completion")
        )
        self._rx = self._ring(_Ring(fd, ring_size, desc, off.rx, XDP_PGOFF_RX_RING, "rx"))
        self._tx = self._ring(_Ring(fd, ring_size, desc, off.tx, XDP_PGOFF_TX_RING, "tx"))
        self._bind()

    def _ring(self, ring: _RingT) -> _RingT:
        """Keep ring for close() (also when a later step of the setup fails)."""
        self._rings.append(ring)
        return ring

    def _setsockopt(
        self,
        opt: int,
        value: ctypes.Structure | ctypes.c_uint32,
        step: str,
        hints: dict[int, str],
    ) -> None:
        ret = _libc.setsockopt(self._fd, SOL_XDP, opt, ctypes.byref(value), ctypes.sizeof(value))
        _check(ret, f"setsockopt {step}", self._fd, hints)

    def _bind(self) -> None:
        flags = XDP_USE_NEED_WAKEUP | (XDP_COPY if self.copy else 0)
        addr = _SockaddrXdp(
            family=AF_XDP, flags=flags, ifindex=self.ifindex, queue_id=self.queue_id
        )
        where = f"ifindex {self.ifindex} queue {self.queue_id}"
        ret = _libc.bind(self._fd, ctypes.byref(addr), ctypes.sizeof(addr))
        _check(
            ret,
            f"bind to {where}",
            self._fd,
            {
                errno.EINVAL: "the socket is tied to another device by SO_BINDTODEVICE, or the "
                "queue does not exist on that device",
                errno.ENODEV: "no such interface in the network namespace the socket was "
                "created in",
                errno.EBUSY: f"another AF_XDP socket is bound to {where}, or was closed in the "
                "last few tens of milliseconds (the kernel frees a queue asynchronously)",
                errno.EOPNOTSUPP: "the driver cannot do zero-copy here; use copy=True",
            },
        )

    @property
    def fd(self) -> int:
        """This object's own copy of the socket fd (for poll, or to pass on)."""
        return self._fd

    def fileno(self) -> int:
        return self._fd

    def _fill(self, addrs: Iterable[int]) -> None:
        """Give frames to the kernel for receiving (the fill ring holds all rx frames)."""
        ring = self._fq
        producer = ring.producer
        count = 0
        for addr in addrs:
            ring.entries[(producer + count) & ring.mask] = addr
            count += 1
        ring.produce(count)

    def receive(self, timeout: float, max_frames: int = 64) -> list[bytes]:
        """Frames that arrive within timeout seconds (returns as soon as any are there)."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        ring = self._rx
        while not ring.filled():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            poller.poll(max(1, round(remaining * 1000)))
        count = min(ring.filled(), max_frames)
        consumer = ring.consumer
        frames = []
        recycled = []
        for i in range(count):
            desc = ring.entries[(consumer + i) & ring.mask]
            frames.append(self._umem[desc.addr : desc.addr + desc.len])
            recycled.append(desc.addr & ~(self.frame_size - 1))
        ring.consume(count)
        self._fill(recycled)
        return frames

    def _reap(self) -> int:
        """Move completed tx frames back to the free list; returns how many."""
        ring = self._cq
        count = ring.filled()
        consumer = ring.consumer
        self._free_tx.extend(ring.entries[(consumer + i) & ring.mask] for i in range(count))
        ring.consume(count)
        self._tx_outstanding -= count
        return count

    def _kick(self) -> None:
        """Wake the kernel's tx path; in copy mode this is what transmits."""
        ret = _libc.sendto(self._fd, None, 0, socket.MSG_DONTWAIT, None, 0)
        if ret < 0 and ctypes.get_errno() not in (errno.EAGAIN, errno.EBUSY, errno.ENOBUFS):
            raise _error(
                "sendto (tx wakeup)",
                self._fd,
                ctypes.get_errno(),
                {
                    errno.ENETDOWN: "the interface is down",
                    errno.ENXIO: "the socket is not bound",
                },
            )

    def send(self, frames: list[bytes], timeout: float = 1.0) -> int:
        """Transmit frames; returns how many of them the kernel completed within timeout.

        Completed means the kernel took the frame, not that it arrived: veth completes and
        then drops frames longer than its MTU plus 14, without counting them in stats().
        Frames still in flight at the deadline stay queued and are reaped by later calls.
        """
        for frame in frames:
            if not 0 < len(frame) <= self.frame_size:
                raise ValueError(f"frame of {len(frame)} bytes; allowed 1..{self.frame_size}")
        deadline = time.monotonic() + timeout
        earlier = self._tx_outstanding
        completed = 0
        queued = 0
        ring = self._tx
        while True:
            completed += self._reap()
            count = min(len(frames) - queued, len(self._free_tx), ring.free())
            producer = ring.producer
            for i in range(count):
                addr = self._free_tx.pop()
                frame = frames[queued + i]
                self._umem[addr : addr + len(frame)] = frame
                desc = ring.entries[(producer + i) & ring.mask]
                desc.addr, desc.len, desc.options = addr, len(frame), 0
            ring.produce(count)
            queued += count
            self._tx_outstanding += count
            done = min(max(completed - earlier, 0), len(frames))
            if done == len(frames) or time.monotonic() >= deadline:
                return done
            if ring.filled() and (self.copy or ring.needs_wakeup):
                self._kick()
            if not count:
                time.sleep(_IDLE_SLEEP)

    def stats(self) -> dict[str, int]:
        """The kernel's XDP_STATISTICS counters for this socket (rx_dropped and so on)."""
        stats = _Statistics()
        optlen = ctypes.c_uint32(ctypes.sizeof(stats))
        ret = _libc.getsockopt(self._fd, SOL_XDP, XDP_STATISTICS, ctypes.byref(stats), optlen)
        _check(ret, "getsockopt XDP_STATISTICS", self._fd)
        return {
            name: getattr(stats, name)
            for name in STAT_NAMES
            if _Statistics.__dict__[name].offset < optlen.value
        }

    def close(self) -> None:
        """Unmap the rings and UMEM and close this object's fd copy (idempotent).

        Closing the last reference blocks 5-11 ms in the kernel (measured on veth), and the
        queue only becomes free for a new bind about 17 ms later; binding sooner gives EBUSY.
        """
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        if not self._umem.closed:
            self._umem.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mac_bytes(mac: str | bytes) -> bytes:
    """Six bytes from 'aa:bb:cc:dd:ee:ff' or from six bytes."""
    raw = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else bytes(mac)
    if len(raw) != 6:
        raise ValueError(f"a MAC address has 6 bytes, got {mac!r}")
    return raw


def make_frame(
    dst_mac: str | bytes, src_mac: str | bytes, payload: bytes, ethertype: int = ETH_P_EXPERIMENTAL
) -> bytes:
    """An Ethernet frame; the default ethertype keeps the kernel stack from acting on it."""
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + ethertype.to_bytes(2, "big") + payload
