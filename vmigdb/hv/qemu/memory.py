"""Guest-physical RAM, read straight from QEMU's shared memory-backend file.

QEMU keeps guest RAM in one file (``memory-backend-file,share=on``); vmigdb maps the same file
read-only. Reading it is a memcpy in vmigdb's own process: no QMP round trip, no gdbstub packet,
and nothing the guest can observe. Writes go through QEMU, except at a stop vmigdb's plugin holds
inside QEMU (QEMU's gdbstub cannot be reached then): the driver writes the file (`write`, on a
descriptor kept for that alone) and has the plugin flush QEMU's translated code before the guest
runs on.

The file is RAM in QEMU's ``ram_addr`` order, not guest-physical order: on the ``pc`` machine the
first ``below_4g`` bytes appear at guest-physical 0, and the rest at 4 GiB (above the PCI hole).
Below 1 MiB the guest may see device memory (the VGA window at 0xa0000) or shadowed ROM instead
of the RAM underneath; reads here return the RAM, which is what the kernel's own page tables point
at everywhere that matters to a debugger.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from vmigdb.arch.x86_64.paging import PhysicalMemoryError

FOUR_GIB = 1 << 32

# QEMU 7.2 hw/i386/pc_piix.c, pc_init1(): the traditional split puts 3.5 GiB below 4 GiB; when
# the RAM does not fit there, gigabyte alignment (true for every current pc-i440fx machine type)
# moves the split down to 3 GiB.
_PC_LOWMEM = 0xE0000000
_PC_LOWMEM_GB_ALIGNED = 0xC0000000


def pc_below_4g(ram_size: int) -> int:
    """Bytes of RAM QEMU 7.2's ``pc`` (i440fx) machine maps below 4 GiB for ``ram_size``."""
    if ram_size < 0:
        raise ValueError(f"negative RAM size {ram_size}")
    lowmem = _PC_LOWMEM
    if ram_size >= lowmem:
        lowmem = _PC_LOWMEM_GB_ALIGNED
    return lowmem if ram_size >= lowmem else ram_size


def _error(address: int) -> PhysicalMemoryError:
    """``PhysicalMemoryError(address)``, with the address also as ``.address``."""
    err = PhysicalMemoryError(address)
    err.address = address  # type: ignore[attr-defined]
    return err


class PhysicalMemory:
    """Guest-physical RAM mapped (shared, read-only) from the backend file.

    Reads are one slice of the mapping: they see the guest's stores as soon as the vCPU makes
    them, and cost no more than a memcpy. A read that is not entirely inside one RAM range raises
    `PhysicalMemoryError` whose ``address`` is the first guest-physical address that is not RAM.
    """

    how = "shared, read directly"  # for `monitor info`

    def __init__(
        self,
        path_or_fd: str | os.PathLike[str] | int,
        size: int,
        below_4g: int,
        writable: bool = False,
    ) -> None:
        if size <= 0 or not 0 <= below_4g <= min(size, FOUR_GIB):
            raise ValueError(f"bad RAM layout: size={size:#x} below_4g={below_4g:#x}")
        self.size = size
        self.below_4g = below_4g
        # End of the RAM that sits above 4 GiB (== 4 GiB when there is none).
        self._high_end = FOUR_GIB + (size - below_4g)
        if isinstance(path_or_fd, int):
            self._mmap = mmap.mmap(path_or_fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        else:
            fd = os.open(Path(path_or_fd), os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        self._view: memoryview | None = memoryview(self._mmap)
        self._closed = False
        self._write_fd = os.dup(path_or_fd) if writable and isinstance(path_or_fd, int) else -1

    @property
    def writable(self) -> bool:
        return self._write_fd >= 0 and not self._closed

    def write(self, pa: int, data: bytes) -> None:
        """Store `data` at `pa` in the file QEMU's guest RAM is (only while QEMU runs no vCPU:
        QEMU does not see the store as a write, so it keeps any code it translated from it)."""
        off = self._offset(pa, len(data))
        if not self.writable:
            raise _error(pa)
        os.pwrite(self._write_fd, data, off)

    def _offset(self, pa: int, length: int) -> int:
        """File offset of ``[pa, pa + length)``, or raise if any of it is not RAM."""
        end = pa + length
        if 0 <= pa and end <= self.below_4g and length >= 0:
            return pa
        if FOUR_GIB <= pa and end <= self._high_end and length >= 0:
            return pa - FOUR_GIB + self.below_4g
        if length < 0:
            raise ValueError(f"negative read length {length}")
        if 0 <= pa < self.below_4g:
            raise _error(self.below_4g)  # runs off low RAM into the PCI hole
        if FOUR_GIB <= pa < self._high_end:
            raise _error(self._high_end)  # runs off the end of RAM
        raise _error(pa)

    def read(self, pa: int, length: int) -> bytes:
        """``length`` bytes of guest-physical memory at ``pa`` (one copy)."""
        off = self._offset(pa, length)
        if self._closed:
            raise _error(pa)
        return self._mmap[off : off + length]

    def view(self, pa: int, length: int) -> memoryview:
        """Zero-copy view of guest-physical memory; it changes as the guest runs."""
        off = self._offset(pa, length)
        if self._view is None:
            raise _error(pa)
        return self._view[off : off + length]

    def ranges(self) -> list[tuple[int, int]]:
        """Guest-physical RAM ranges as ``(start, end)``, end exclusive."""
        out = [(0, self.below_4g)] if self.below_4g else []
        if self.size > self.below_4g:
            out.append((FOUR_GIB, self._high_end))
        return out

    def close(self) -> None:
        """Unmap. Safe to call twice; views still held by callers keep the mapping alive."""
        self._closed = True
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        if self._view is not None:
            self._view.release()
            self._view = None
        try:
            self._mmap.close()
        except BufferError:
            # Someone still holds a view(); the mapping goes when the last one is dropped.
            pass

    def __enter__(self) -> PhysicalMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
