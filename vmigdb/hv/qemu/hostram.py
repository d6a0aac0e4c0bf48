"""Guest RAM of a QEMU that vmigdb did not start: where it is, and how to read it.

QEMU says where guest RAM is: `info mtree -f` lists, for the "memory" address space, every range
that is RAM with the RAM block it comes from and the offset into it; `gpa2hva` gives the host
address in QEMU's process of any guest-physical address. Two ways to read it, best first:
- the RAM block is a shared file (memory-backend-file, share=on) vmigdb can open: map it, and
  reads are a memcpy, as for a guest vmigdb boots (memory.py);
- otherwise /proc/PID/mem of QEMU's process, at the host addresses QEMU reports: one pread per
  read. The kernel allows that only to a process that may ptrace QEMU (root, or QEMU's user
  where ptrace is not restricted); else attaching fails with a one-line error saying so.

Neither way touches the guest or QEMU's state. Checked on QEMU 7.2's monitor output; the formats
are unchanged in QEMU 10.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.errors import SetupError

_FLATVIEW_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (\S+)(?: @([0-9a-f]+))?", re.M
)


@dataclass(frozen=True)
class Segment:
    """Guest-physical [start, end) is RAM block `block` from byte `offset` on."""

    start: int
    end: int
    block: str
    offset: int


def parse_ram_map(mtree: str) -> list[Segment]:
    """The guest's RAM, from `info mtree -f`: the flat view of the "memory" address space, main
    RAM only (the block that holds guest-physical 0x100000; device RAM such as VGA's is left
    out). :raises SetupError: if there is none."""
    views = re.split(r"^FlatView #\d+", mtree, flags=re.M)
    view = next((v for v in views if re.search(r'^\s*AS "memory"', v, re.M)), None)
    if view is None:
        raise SetupError('QEMU\'s `info mtree -f` shows no "memory" address space')
    segments = [
        Segment(int(m[1], 16), int(m[2], 16) + 1, m[4], int(m[5] or "0", 16))
        for m in _FLATVIEW_LINE.finditer(view)
        if m[3] == "ram"
    ]
    main = next((s.block for s in segments if s.start <= 0x100000 < s.end), None)
    if main is None:
        raise SetupError("QEMU's memory map has no RAM at 1 MiB: not a PC guest vmigdb knows")
    return sorted((s for s in segments if s.block == main), key=lambda s: s.start)


def _error(address: int) -> PhysicalMemoryError:
    err = PhysicalMemoryError(address)
    err.address = address  # type: ignore[attr-defined]
    return err


class SegmentedMemory:
    """Guest-physical RAM over `segments`, each read through `read_at(segment, offset, length)`.
    Same contract as memory.PhysicalMemory: a read that leaves RAM raises PhysicalMemoryError
    with the first address that is not RAM."""

    def __init__(
        self,
        segments: list[Segment],
        read_at: Callable[[int, int, int], bytes],
        how: str,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self._segments = segments
        self._read_at = read_at  # (segment index, offset into the segment, length) -> bytes
        self._close = close
        self.how = how
        self.size = sum(s.end - s.start for s in segments)

    def read(self, pa: int, length: int) -> bytes:
        if length < 0:
            raise ValueError(f"negative read length {length}")
        out = bytearray()
        while length > 0:
            index = next((i for i, s in enumerate(self._segments) if s.start <= pa < s.end), None)
            if index is None:
                raise _error(pa)
            segment = self._segments[index]
            n = min(length, segment.end - pa)
            data = self._read_at(index, pa - segment.start, n)
            if len(data) != n:
                raise _error(pa + len(data))
            out += data
            pa += n
            length -= n
        return bytes(out)

    def ranges(self) -> list[tuple[int, int]]:
        """Contiguous guest-physical RAM ranges (adjacent segments merged)."""
        out: list[tuple[int, int]] = []
        for s in self._segments:
            if out and out[-1][1] == s.start:
                out[-1] = (out[-1][0], s.end)
            else:
                out.append((s.start, s.end))
        return out

    def close(self) -> None:
        self._close()


def shared_file_memory(path: Path, size: int, segments: list[Segment]) -> SegmentedMemory:
    """Map QEMU's shared RAM file read-only. :raises OSError: if it cannot be opened or mapped."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            raise OSError(f"{path} is smaller than guest RAM")
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)

    def read_at(index: int, offset: int, length: int) -> bytes:
        start = segments[index].offset + offset
        return mapping[start : start + length]

    return SegmentedMemory(segments, read_at, f"shared file {path}, read directly", mapping.close)


def process_memory(pid: int, segments: list[Segment], hvas: Iterable[int]) -> SegmentedMemory:
    """Read guest RAM from QEMU's address space through /proc/PID/mem at QEMU's host addresses
    (`gpa2hva` of each segment's start). :raises SetupError: if the kernel does not allow it."""
    bases = list(hvas)
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise SetupError(
            f"cannot read QEMU's memory (/proc/{pid}/mem): not permitted; QEMU's RAM is not a "
            "shared file vmigdb can open, so run vmigdb as root (or start QEMU with "
            "-object memory-backend-file,share=on)"
        ) from None
    except OSError as exc:
        raise SetupError(f"cannot read QEMU's memory (/proc/{pid}/mem): {exc.strerror}") from None

    def read_at(index: int, offset: int, length: int) -> bytes:
        try:
            return os.pread(fd, length, bases[index] + offset)
        except OSError:
            return b""

    try:
        probe = os.pread(fd, 1, bases[0]) if bases else b""
    except OSError as exc:
        os.close(fd)
        raise SetupError(
            f"cannot read QEMU's memory (/proc/{pid}/mem): {exc.strerror}; run vmigdb as root"
        ) from None
    if bases and len(probe) != 1:
        os.close(fd)
        raise SetupError(f"QEMU's memory at {bases[0]:#x} reads as nothing: not guest RAM")
    return SegmentedMemory(
        segments, read_at, f"read from QEMU's process (/proc/{pid}/mem)", lambda: os.close(fd)
    )
