"""Guest page-table walks over guest-physical memory.

GDB asks for guest-virtual memory; the hypervisor side only has guest-physical memory, so
vmigdb walks the guest's page tables itself (the way drgn does for vmcores): 4- and 5-level
long-mode paging, plus PAE and legacy 32-bit paging for early boot. An unmapped address is a
normal answer (a `Fault` value), not an exception: GDB probes unmapped memory all the time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

__all__ = [
    "NON_CANONICAL",
    "NOT_PRESENT",
    "OUTSIDE_RAM",
    "OUTSIDE_32BIT",
    "RESERVED_BIT",
    "Fault",
    "PagingMode",
    "PhysicalMemoryError",
    "ReadPhys",
    "Translation",
    "Translator",
    "cr3_tables",
    "paging_mode",
    "translate",
    "translate_range",
]


class PhysicalMemoryError(Exception):
    """A guest-physical read hit an address outside guest RAM."""


ReadPhys = Callable[[int, int], bytes]
"""``bytes read_phys(int phys_addr, int length)``: exactly *length* bytes.

:raises PhysicalMemoryError: if the range is not guest RAM.
"""


class PagingMode(enum.Enum):
    """How the vCPU translates linear addresses (from CR0, CR4 and EFER)."""

    NONE = "none"  # paging off: linear = physical
    LEGACY32 = "legacy32"  # 2-level, 4-byte entries, 4K/4M pages (CR4.PSE assumed set)
    PAE = "pae"  # 3-level, 32-bit linear addresses, 4K/2M pages
    LONG4 = "long4"  # 4-level, 48-bit canonical addresses
    LONG5 = "long5"  # 5-level (LA57), 57-bit canonical addresses


_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_CR4_LA57 = 1 << 12
_EFER_LMA = 1 << 10


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """The paging mode selected by CR0.PG, EFER.LMA, CR4.LA57 and CR4.PAE."""
    if not cr0 & _CR0_PG:
        return PagingMode.NONE
    if efer & _EFER_LMA:
        return PagingMode.LONG5 if cr4 & _CR4_LA57 else PagingMode.LONG4
    return PagingMode.PAE if cr4 & _CR4_PAE else PagingMode.LEGACY32


@dataclass(frozen=True, slots=True)
class Translation:
    """A successful translation of one virtual address.

    :ivar va: The virtual address asked for.
    :ivar pa: Its physical address.
    :ivar page_size: Size of the page holding it (4K, 2M, 4M or 1G).
    :ivar writable: R/W set at every level.
    :ivar user: U/S set at every level.
    :ivar nx: XD set at any level.
    :ivar level: Level of the leaf entry (1 = page table; 0 when paging is off).
    """

    va: int
    pa: int
    page_size: int
    writable: bool
    user: bool
    nx: bool
    level: int


# Fault reasons.
NOT_PRESENT = "not present"
NON_CANONICAL = "non-canonical address"
RESERVED_BIT = "reserved bit"
OUTSIDE_RAM = "outside RAM"
OUTSIDE_32BIT = "address above 4 GiB in 32-bit paging"


@dataclass(frozen=True, slots=True)
class Fault:
    """Why a virtual address does not translate.

    :ivar va: The virtual address asked for.
    :ivar level: Level of the offending entry (5..1); the top level for address-range faults.
    :ivar entry: The raw offending entry (0 if it could not be read or none was involved).
    :ivar reason: One of `NOT_PRESENT`, `NON_CANONICAL`, `RESERVED_BIT`, `OUTSIDE_RAM`,
        `OUTSIDE_32BIT`.
    """

    va: int
    level: int
    entry: int
    reason: str


_P = 1
_RW = 1 << 1
_US = 1 << 2
_PS = 1 << 7
_NX = 1 << 63
_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 12..51: MAXPHYADDR 52
_U64 = (1 << 64) - 1
_PAE_PDPTE_RESERVED = 0x1E6  # bits 1, 2, 5..8 must be 0 in a PAE PDPTE
_PAGE = 0x1000



def cr3_tables(cr3: int) -> int:
    """CR3 as the page tables to walk: without PCID bits only."""
    return cr3 & _ADDR_MASK

def _read_entry(read_phys: ReadPhys, addr: int, size: int) -> int | None:
    try:
        raw = read_phys(addr, size)
    except PhysicalMemoryError:
        return None
    if len(raw) != size:
        return None
    return int.from_bytes(raw, "little")


def _walk_long(read_phys: ReadPhys, cr3: int, va: int, levels: int) -> Translation | Fault:
    width = 48 if levels == 4 else 57
    top = va >> (width - 1)
    if top != 0 and top != (1 << (65 - width)) - 1:
        return Fault(va, levels, 0, NON_CANONICAL)
    table = cr3 & _ADDR_MASK  # drops PCID (bits 0..11), LAM and no-flush (bit 63) bits
    writable = user = True
    nx = False
    for level in range(levels, 0, -1):
        shift = 3 + 9 * level  # 39 for the PML4, 12 for the page table
        entry = _read_entry(read_phys, table + ((va >> shift) & 0x1FF) * 8, 8)
        if entry is None:
            return Fault(va, level, 0, OUTSIDE_RAM)
        if not entry & _P:
            return Fault(va, level, entry, NOT_PRESENT)
        writable = writable and bool(entry & _RW)
        user = user and bool(entry & _US)
        nx = nx or bool(entry & _NX)
        if level == 1 or entry & _PS:
            if level > 3:
                return Fault(va, level, entry, RESERVED_BIT)  # PS must be 0 in PML4E/PML5E
            size = 1 << shift
            # Large pages: bit 12 is PAT, bits 13..shift-1 are reserved.
            if level > 1 and entry & (size - 1) & ~0x1FFF & _ADDR_MASK:
                return Fault(va, level, entry, RESERVED_BIT)
            frame = entry & _ADDR_MASK & ~(size - 1)
            return Translation(va, frame | (va & (size - 1)), size, writable, user, nx, level)
        table = entry & _ADDR_MASK
    raise AssertionError("unreachable")


def _walk_pae(read_phys: ReadPhys, cr3: int, va: int) -> Translation | Fault:
    if va >> 32:
        return Fault(va, 3, 0, OUTSIDE_32BIT)
    pdpte = _read_entry(read_phys, (cr3 & 0xFFFF_FFE0) + (va >> 30) * 8, 8)
    if pdpte is None:
        return Fault(va, 3, 0, OUTSIDE_RAM)
    if not pdpte & _P:
        return Fault(va, 3, pdpte, NOT_PRESENT)
    if pdpte & _PAE_PDPTE_RESERVED:
        return Fault(va, 3, pdpte, RESERVED_BIT)
    table = pdpte & _ADDR_MASK
    writable = user = True
    nx = False
    for level in (2, 1):
        shift = 3 + 9 * level
        entry = _read_entry(read_phys, table + ((va >> shift) & 0x1FF) * 8, 8)
        if entry is None:
            return Fault(va, level, 0, OUTSIDE_RAM)
        if not entry & _P:
            return Fault(va, level, entry, NOT_PRESENT)
        writable = writable and bool(entry & _RW)
        user = user and bool(entry & _US)
        nx = nx or bool(entry & _NX)
        if level == 1 or entry & _PS:
            size = 1 << shift
            if level == 2 and entry & 0x1F_E000:  # bits 13..20 reserved in a 2M PDE
                return Fault(va, level, entry, RESERVED_BIT)
            frame = entry & _ADDR_MASK & ~(size - 1)
            return Translation(va, frame | (va & (size - 1)), size, writable, user, nx, level)
        table = entry & _ADDR_MASK
    raise AssertionError("unreachable")


def _walk_legacy(read_phys: ReadPhys, cr3: int, va: int) -> Translation | Fault:
    if va >> 32:
        return Fault(va, 2, 0, OUTSIDE_32BIT)
    pde = _read_entry(read_phys, (cr3 & 0xFFFF_F000) + (va >> 22) * 4, 4)
    if pde is None:
        return Fault(va, 2, 0, OUTSIDE_RAM)
    if not pde & _P:
        return Fault(va, 2, pde, NOT_PRESENT)
    if pde & _PS:  # 4M page; PSE-36 puts physical bits 32..39 in bits 13..20
        if pde & (1 << 21):
            return Fault(va, 2, pde, RESERVED_BIT)
        frame = (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32
        return Translation(
            va, frame | (va & 0x3F_FFFF), 0x40_0000, bool(pde & _RW), bool(pde & _US), False, 2
        )
    pte = _read_entry(read_phys, (pde & 0xFFFF_F000) + ((va >> 12) & 0x3FF) * 4, 4)
    if pte is None:
        return Fault(va, 1, 0, OUTSIDE_RAM)
    if not pte & _P:
        return Fault(va, 1, pte, NOT_PRESENT)
    return Translation(
        va,
        (pte & 0xFFFF_F000) | (va & 0xFFF),
        _PAGE,
        bool(pde & pte & _RW),
        bool(pde & pte & _US),
        False,
        1,
    )


def translate(read_phys: ReadPhys, cr3: int, va: int, mode: PagingMode) -> Translation | Fault:
    """Walk the page tables rooted at *cr3* for virtual address *va*.

    ``Translation | Fault translate(ReadPhys read_phys, u64 cr3, u64 va, PagingMode mode)``

    Reads each table entry with ``read_phys(addr, 8)`` (4 bytes in `PagingMode.LEGACY32`).
    A hole, a bad entry or a table outside RAM comes back as a `Fault`.

    :raises ValueError: if *va* is not a 64-bit unsigned value.
    """
    if not 0 <= va <= _U64:
        raise ValueError(f"virtual address out of range: {va:#x}")
    if mode is PagingMode.LONG4:
        return _walk_long(read_phys, cr3, va, 4)
    if mode is PagingMode.LONG5:
        return _walk_long(read_phys, cr3, va, 5)
    if mode is PagingMode.PAE:
        return _walk_pae(read_phys, cr3, va)
    if mode is PagingMode.LEGACY32:
        return _walk_legacy(read_phys, cr3, va)
    return Translation(va, va, _PAGE, True, True, False, 0)


def _hole_end(fault: Fault, mode: PagingMode) -> int:
    """First address after *fault.va* that might translate: skips the whole unmapped span."""
    va = fault.va
    if fault.reason == OUTSIDE_32BIT:
        return 1 << 64
    if fault.reason == NON_CANONICAL:
        width = 57 if mode is PagingMode.LONG5 else 48
        return (1 << 64) - (1 << (width - 1))  # start of the canonical upper half
    if mode is PagingMode.LEGACY32:
        span = 0x40_0000 if fault.level == 2 else _PAGE
    else:
        span = 1 << (3 + 9 * fault.level)
    return (va | (span - 1)) + 1


def _chunks(
    lookup: Callable[[int], Translation | Fault], va: int, length: int, mode: PagingMode
) -> Iterator[tuple[int, int | None, int]]:
    """Split ``[va, va+length)`` into (va, pa or None, length) runs.

    Consecutive mapped runs merge when physically contiguous, consecutive holes always merge.
    """
    if length < 0 or not 0 <= va <= _U64:
        raise ValueError(f"bad virtual range {va:#x} + {length:#x}")
    end = va + length
    run_va, run_pa, run_len = va, None, 0
    cur = va
    while cur < end:
        if cur > _U64:
            pa, step = None, end - cur
        else:
            t = lookup(cur)
            if isinstance(t, Translation):
                pa = t.pa
                step = min(end, (cur | (t.page_size - 1)) + 1) - cur
            else:
                pa = None
                step = min(end, _hole_end(t, mode)) - cur
        if run_len and (
            (pa is None and run_pa is None)
            or (pa is not None and run_pa is not None and run_pa + run_len == pa)
        ):
            run_len += step
        else:
            if run_len:
                yield run_va, run_pa, run_len
            run_va, run_pa, run_len = cur, pa, step
        cur += step
    if run_len:
        yield run_va, run_pa, run_len


def translate_range(
    read_phys: ReadPhys, cr3: int, va: int, length: int, mode: PagingMode
) -> Iterator[tuple[int, int | None, int]]:
    """Cover exactly ``[va, va+length)`` with ``(va, pa or None, length)`` chunks, drgn style.

    ``Iterator[(u64 va, u64 pa | None, int length)] translate_range(...)``

    ``None`` marks unmapped chunks. Physically contiguous consecutive pages come merged, so
    a chunk may span pages; bytes past 2**64 are unmapped.

    :raises ValueError: if *length* is negative or *va* not a 64-bit unsigned value.
    """
    return _chunks(partial(translate, read_phys, cr3, mode=mode), va, length, mode)


_CACHE_LIMIT = 65536


class Translator:
    """Page-table walker with a per-page translation cache, valid while the guest is stopped.

    The owner must call `flush` whenever the guest runs or guest memory is written (a write
    may change page tables). Keys include CR3 and the mode, so switching either is safe.
    """

    __slots__ = ("_read_phys", "_cache")

    def __init__(self, read_phys: ReadPhys) -> None:
        self._read_phys = read_phys
        self._cache: dict[tuple[int, int, PagingMode], Translation | Fault] = {}

    def translate(self, cr3: int, va: int, mode: PagingMode) -> Translation | Fault:
        """Like module-level `translate`, cached per (cr3, 4K page, mode).

        :raises ValueError: if *va* is not a 64-bit unsigned value.
        """
        if not 0 <= va <= _U64:
            raise ValueError(f"virtual address out of range: {va:#x}")
        key = (cr3, va >> 12, mode)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            hit = translate(self._read_phys, cr3, va & ~0xFFF, mode)
            self._cache[key] = hit
        offset = va & 0xFFF
        if not offset:
            return hit
        if isinstance(hit, Translation):
            return Translation(
                va, hit.pa + offset, hit.page_size, hit.writable, hit.user, hit.nx, hit.level
            )
        return Fault(va, hit.level, hit.entry, hit.reason)

    def read_virtual(self, cr3: int, va: int, length: int, mode: PagingMode) -> bytes:
        """Read up to *length* bytes from *va*, stopping at the first unreadable byte.

        ``bytes read_virtual(u64 cr3, u64 va, int length, PagingMode mode)``

        Partial like GDB's ``m`` packet: ``b""`` if the first byte is unmapped or its
        physical page is outside RAM.

        :raises ValueError: if *length* is negative or *va* not a 64-bit unsigned value.
        """
        out = bytearray()
        for _, pa, size in _chunks(partial(self.translate, cr3, mode=mode), va, length, mode):
            if pa is None:
                break
            try:
                data = self._read_phys(pa, size)
            except PhysicalMemoryError:
                data = self._read_partial(pa, size)
                out += data
                break
            out += data
            if len(data) != size:
                break
        return bytes(out)

    def _read_partial(self, pa: int, size: int) -> bytes:
        """Page by page, for a merged run whose tail leaves RAM."""
        out = bytearray()
        end = pa + size
        while pa < end:
            step = min(end, (pa | 0xFFF) + 1) - pa
            try:
                data = self._read_phys(pa, step)
            except PhysicalMemoryError:
                break
            out += data
            if len(data) != step:
                break
            pa += step
        return bytes(out)

    def flush(self) -> None:
        """Forget every cached translation (the guest ran, or memory was written)."""
        self._cache.clear()
