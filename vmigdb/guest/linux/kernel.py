"""The running Linux kernel as identified in guest RAM, and reading its virtual memory.

`vmigdb.guest.linux.identify.find_kernel` identifies the kernel (VMCOREINFO, checked against
memory); this module holds what it found (`LinuxKernel`) and reads kernel virtual memory through it
(`KernelMemory`).

x86-64 kernel address translation (arch/x86/include/asm/page_64.h, ``__phys_addr_nodebug()``):

- kernel image, ``[__START_KERNEL_map, __START_KERNEL_map + KERNEL_IMAGE_SIZE)``::

      pa = va - __START_KERNEL_map + phys_base          (__START_KERNEL_map = 0xffffffff80000000)

  ``phys_base`` already folds in both KASLR slides: with the image linked at ``0xffffffff81000000``,
  loaded at physical ``P`` and randomised by ``KERNELOFFSET`` virtually,
  ``phys_base = P - 0x1000000 - KERNELOFFSET`` (it is negative when the virtual slide is the bigger
  one, e.g. ``NUMBER(phys_base)=-134217728``; arithmetic is modulo 2**64).
- direct map: ``pa = va - page_offset_base`` (``page_offset_base`` randomised under
  CONFIG_RANDOMIZE_MEMORY);
- everything else (vmalloc, vmemmap, modules, fixmap): a page walk from ``init_top_pgt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmigdb.arch.x86_64.paging import (
    PagingMode,
    PhysicalMemoryError,
    ReadPhys,
    Translation,
    Translator,
)
from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.vmcoreinfo import vmcoreinfo_number, vmcoreinfo_symbol

__all__ = [
    "START_KERNEL_MAP",
    "FaultError",
    "KernelMemory",
    "LinuxKernel",
    "ReadPhys",
]

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
# KERNEL_IMAGE_SIZE (arch/x86/include/asm/page_64_types.h): 1 GiB with CONFIG_RANDOMIZE_BASE,
# else 512 MiB. VMCOREINFO has NUMBER(KERNEL_IMAGE_SIZE) since v4.19 (commit 1303a27c9c32).
_IMAGE_SIZE_KASLR = 1 << 30
_IMAGE_SIZE_FIXED = 512 << 20
_U64 = (1 << 64) - 1


class FaultError(GuestError):
    """A kernel virtual address could not be read (drgn's ``FaultError``).

    :ivar address: The first address that could not be read.
    """

    def __init__(self, address: int, message: str = "could not read memory") -> None:
        super().__init__(f"{message} at {address:#x}")
        self.address = address


@dataclass(frozen=True)
class LinuxKernel:
    """The running kernel, as identified from guest RAM by `find_kernel`.

    :ivar release: ``OSRELEASE`` (``uname -r``), e.g. ``"6.1.0-56-cloud-amd64"``.
    :ivar kaslr_offset: ``KERNELOFFSET``: virtual slide of the kernel image.
    :ivar phys_base: ``NUMBER(phys_base)`` modulo 2**64; see `kernel_image_pa`.
    :ivar page_offset_base: Start of the direct map of all physical memory.
    :ivar kernel_cr3: Physical address of ``init_top_pgt`` (``swapper_pg_dir``), the kernel's
        own page tables.
    :ivar la57: 5-level paging (``NUMBER(pgtable_l5_enabled)``).
    :ivar vmcoreinfo: Every ``KEY=value`` of the VMCOREINFO note that was used.
    """

    release: str
    kaslr_offset: int
    phys_base: int
    page_offset_base: int
    kernel_cr3: int
    la57: bool = False
    vmcoreinfo: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def paging_mode(self) -> PagingMode:
        """`PagingMode.LONG5` if `la57`, else `PagingMode.LONG4`."""
        return PagingMode.LONG5 if self.la57 else PagingMode.LONG4

    @property
    def image_size(self) -> int:
        """KERNEL_IMAGE_SIZE: the span of the kernel-image mapping above ``__START_KERNEL_map``."""
        size = vmcoreinfo_number(self.vmcoreinfo, "NUMBER(KERNEL_IMAGE_SIZE)")
        if size:
            return size
        return _IMAGE_SIZE_KASLR if self.kaslr_offset else _IMAGE_SIZE_FIXED

    def is_image_address(self, va: int) -> bool:
        """True if *va* lies in the kernel-image mapping (text, data, bss; not modules)."""
        return START_KERNEL_MAP <= va < START_KERNEL_MAP + self.image_size

    def kernel_image_pa(self, va: int) -> int:
        """Physical address of a kernel-image virtual address.

        ``phys_addr_t kernel_image_pa(unsigned long va)``: ``va - __START_KERNEL_map + phys_base``.

        :raises ValueError: if *va* is not in the kernel-image mapping.
        """
        if not self.is_image_address(va):
            raise ValueError(f"{va:#x} is not a kernel-image address")
        return (va - START_KERNEL_MAP + self.phys_base) & _U64

    def symbol(self, name: str) -> int | None:
        """``SYMBOL(name)`` from VMCOREINFO, or None if the note does not export it."""
        return vmcoreinfo_symbol(self.vmcoreinfo, name)


class KernelMemory:
    """Reads kernel virtual memory out of guest-physical memory.

    Kernel-image addresses are translated arithmetically (`LinuxKernel.kernel_image_pa`);
    everything else (direct map, vmalloc, modules) by a page walk from `LinuxKernel.kernel_cr3`,
    cached per page. Call `flush` when the guest has run: its page tables may have changed.

    :ivar kernel: The `LinuxKernel` whose memory this reads.
    :ivar cache: Free for helpers to keep what they derived from this kernel (drgn's
        ``prog.cache``); `flush` leaves it alone.
    """

    def __init__(self, read_phys: ReadPhys, kernel: LinuxKernel) -> None:
        self.kernel = kernel
        self.cache: dict[str, Any] = {}
        self._read_phys = read_phys
        self._translator = Translator(read_phys)
        self._mode = kernel.paging_mode
        self._image_start = START_KERNEL_MAP
        self._image_end = START_KERNEL_MAP + kernel.image_size

    def flush(self) -> None:
        """Forget cached page-table translations (the guest ran or memory was written)."""
        self._translator.flush()

    def translate(self, va: int) -> int:
        """Physical address of kernel virtual address *va*.

        :raises FaultError: if *va* is not mapped in the kernel's page tables.
        """
        if self._image_start <= va < self._image_end:
            return self.kernel.kernel_image_pa(va)
        if not 0 <= va <= _U64:
            raise FaultError(va, "address out of range")
        t = self._translator.translate(self.kernel.kernel_cr3, va, self._mode)
        if isinstance(t, Translation):
            return t.pa
        raise FaultError(va, f"cannot translate ({t.reason})")

    def read(self, va: int, size: int) -> bytes:
        """*size* bytes of kernel virtual memory at *va*.

        :raises FaultError: if any byte is unmapped or outside guest RAM; ``address`` is the
            first such byte.
        :raises ValueError: if *size* is negative.
        """
        if size < 0:
            raise ValueError(f"negative read size {size}")
        if size == 0:
            return b""
        if not 0 <= va <= _U64 or va + size - 1 > _U64:
            raise FaultError(va if 0 <= va <= _U64 else 0, "address out of range")
        end = va + size
        if self._image_start <= va and end <= self._image_end:
            return self._read_image(va, size)
        out = bytearray()
        cur = va
        while cur < end:
            if self._image_start <= cur < self._image_end:
                step = min(end, self._image_end) - cur
                out += self._read_image(cur, step)
            else:
                step = (min(end, self._image_start) if cur < self._image_start else end) - cur
                data = self._translator.read_virtual(self.kernel.kernel_cr3, cur, step, self._mode)
                if len(data) != step:
                    raise FaultError(cur + len(data))
                out += data
            cur += step
        return bytes(out)

    def read_physical(self, pa: int, size: int) -> bytes:
        """Guest-physical memory. :raises FaultError: outside guest RAM"""
        try:
            data = self._read_phys(pa, size)
        except PhysicalMemoryError:
            raise FaultError(pa, "outside guest RAM (physical)") from None
        if len(data) != size:
            raise FaultError(pa + len(data), "outside guest RAM (physical)")
        return data

    def read_user(self, cr3: int, va: int, size: int) -> bytes:
        """Up to *size* bytes of a process's memory at *va*, through its page tables at *cr3*
        (``task_cr3``): the readable prefix, empty if the first byte is not mapped (or not
        present: the page was never touched, or is swapped out)."""
        if size <= 0 or not 0 <= va <= _U64:
            return b""
        return self._translator.read_virtual(cr3, va, min(size, _U64 + 1 - va), self._mode)

    def _read_image(self, va: int, size: int) -> bytes:
        pa = self.kernel.kernel_image_pa(va)
        try:
            data = self._read_phys(pa, size)
        except PhysicalMemoryError as e:
            bad = getattr(e, "address", pa)
            raise FaultError(va + max(0, bad - pa), "outside guest RAM") from None
        if len(data) != size:
            raise FaultError(va + len(data), "outside guest RAM")
        return data

    def u8(self, va: int) -> int:
        """``u8`` at *va*. :raises FaultError: if unreadable."""
        return self.read(va, 1)[0]

    def u16(self, va: int) -> int:
        """Little-endian ``u16`` at *va*. :raises FaultError: if unreadable."""
        return int.from_bytes(self.read(va, 2), "little")

    def u32(self, va: int) -> int:
        """Little-endian ``u32`` at *va*. :raises FaultError: if unreadable."""
        return int.from_bytes(self.read(va, 4), "little")

    def u64(self, va: int) -> int:
        """Little-endian ``u64`` at *va*. :raises FaultError: if unreadable."""
        return int.from_bytes(self.read(va, 8), "little")

    def string(self, va: int, max: int = 256) -> str:
        """NUL-terminated string at *va*, at most *max* bytes (UTF-8, bad bytes replaced).

        Reads page by page, so a string that ends just before an unmapped page is fine.

        :raises FaultError: if a byte before the NUL (or before *max*) is unreadable.
        """
        out = bytearray()
        cur = va
        while len(out) < max:
            step = min(max - len(out), 0x1000 - (cur & 0xFFF))
            chunk = self.read(cur, step)
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                break
            out += chunk
            cur += step
        return out.decode("utf-8", "replace")
