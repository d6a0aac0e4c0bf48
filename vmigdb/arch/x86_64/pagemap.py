"""Every mapping of one address space, enumerated from its page tables.

`translate` answers "where does this address go"; this module answers "what is mapped at all", as
QEMU's `info mem`/`info tlb` and Linux's /proc/PID/maps do: a walk over whole tables (one 4K read
per table, not one per entry) that yields each present leaf (4K, 2M, 4M or 1G page) in address
order. The same entries `translate` refuses (PS set in a PML4E/PML5E, reserved bits in a large
page) are skipped, so a listed page is always one vmigdb can read.

Addresses come out "raw", as the table indices make them (bit 47, or 56, not sign-extended); use
`canonical` to print them. `regions` merges neighbouring pages with the same permissions, the way
QEMU's `info mem` does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vmigdb.arch.x86_64.paging import PagingMode, PhysicalMemoryError, ReadPhys

__all__ = ["Leaf", "Region", "canonical", "leaves", "regions"]

_P, _RW, _US, _PS, _NX = 1, 1 << 1, 1 << 2, 1 << 7, 1 << 63
_ADDR = 0x000F_FFFF_FFFF_F000
_TABLE64 = struct.Struct("<512Q")
_TABLE32 = struct.Struct("<1024I")


@dataclass(frozen=True, slots=True)
class Leaf:
    """One present page.

    :ivar va: Its first virtual address, raw (not sign-extended; see `canonical`).
    :ivar pa: Its physical frame.
    :ivar size: 4K, 2M, 4M or 1G.
    :ivar entry: The raw leaf entry (flags as the guest wrote them).
    :ivar writable: R/W set at every level.
    :ivar user: U/S set at every level.
    :ivar nx: XD set at any level.
    """

    va: int
    pa: int
    size: int
    entry: int
    writable: bool
    user: bool
    nx: bool


@dataclass(frozen=True, slots=True)
class Region:
    """Contiguous virtual pages with the same permissions (raw addresses, `end` exclusive)."""

    start: int
    end: int
    writable: bool
    user: bool
    nx: bool


def _width(mode: PagingMode) -> int:
    return {PagingMode.LONG5: 57, PagingMode.LONG4: 48}.get(mode, 32)


def canonical(va: int, mode: PagingMode) -> int:
    """Sign-extend a raw address from bit 47 (bit 56 with 5-level paging), as the CPU does."""
    width = _width(mode)
    if width < 64 and va & (1 << (width - 1)):
        va |= ((1 << 64) - 1) ^ ((1 << width) - 1)
    return va


def _table(read_phys: ReadPhys, pa: int, layout: struct.Struct) -> tuple[int, ...] | None:
    try:
        raw = read_phys(pa, layout.size)
    except PhysicalMemoryError:
        return None
    return layout.unpack(raw) if len(raw) == layout.size else None


def _walk64(
    read_phys: ReadPhys, table_pa: int, level: int, base: int, inherited: tuple[bool, bool, bool]
) -> Iterator[Leaf]:
    """Long-mode and PAE tables below the top: 512 eight-byte entries per table."""
    entries = _table(read_phys, table_pa, _TABLE64)
    if entries is None:
        return
    shift = 3 + 9 * level
    size = 1 << shift
    for index, entry in enumerate(entries):
        if not entry & _P:
            continue
        writable = inherited[0] and bool(entry & _RW)
        user = inherited[1] and bool(entry & _US)
        nx = inherited[2] or bool(entry & _NX)
        va = base + (index << shift)
        if level == 1 or entry & _PS:
            if level > 3:
                continue  # PS is reserved in a PML4E/PML5E: translate faults there too
            if level > 1 and entry & (size - 1) & ~0x1FFF & _ADDR:
                continue  # reserved bits of a large page
            yield Leaf(va, entry & _ADDR & ~(size - 1), size, entry, writable, user, nx)
        else:
            yield from _walk64(read_phys, entry & _ADDR, level - 1, va, (writable, user, nx))


def _walk_legacy(read_phys: ReadPhys, cr3: int) -> Iterator[Leaf]:
    directory = _table(read_phys, cr3 & 0xFFFF_F000, _TABLE32)
    if directory is None:
        return
    for i, pde in enumerate(directory):
        if not pde & _P:
            continue
        if pde & _PS:  # 4M page, PSE-36 physical bits 32..39 in bits 13..20
            if pde & (1 << 21):
                continue
            frame = (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32
            yield Leaf(i << 22, frame, 0x40_0000, pde, bool(pde & _RW), bool(pde & _US), False)
            continue
        table = _table(read_phys, pde & 0xFFFF_F000, _TABLE32)
        for j, pte in enumerate(table or ()):
            if pte & _P:
                yield Leaf(
                    (i << 22) | (j << 12),
                    pte & 0xFFFF_F000,
                    0x1000,
                    pte,
                    bool(pde & pte & _RW),
                    bool(pde & pte & _US),
                    False,
                )


def _walk_pae(read_phys: ReadPhys, cr3: int) -> Iterator[Leaf]:
    try:
        raw = read_phys(cr3 & 0xFFFF_FFE0, 32)
    except PhysicalMemoryError:
        return
    for i, pdpte in enumerate(struct.unpack("<4Q", raw)):
        if pdpte & _P and not pdpte & 0x1E6:  # bits 1, 2, 5..8 reserved in a PAE PDPTE
            yield from _walk64(read_phys, pdpte & _ADDR, 2, i << 30, (True, True, False))


def leaves(read_phys: ReadPhys, cr3: int, mode: PagingMode) -> Iterator[Leaf]:
    """Every present page of the address space rooted at `cr3`, in address order.

    With paging off there is no page table: nothing is yielded.
    """
    if mode is PagingMode.LONG4:
        return _walk64(read_phys, cr3 & _ADDR, 4, 0, (True, True, False))
    if mode is PagingMode.LONG5:
        return _walk64(read_phys, cr3 & _ADDR, 5, 0, (True, True, False))
    if mode is PagingMode.PAE:
        return _walk_pae(read_phys, cr3)
    if mode is PagingMode.LEGACY32:
        return _walk_legacy(read_phys, cr3)
    return iter(())


def regions(
    pages: Iterator[Leaf], key: Callable[[Leaf], tuple[bool, bool, bool]] | None = None
) -> Iterator[Region]:
    """Merge neighbouring pages whose permissions (writable, user, nx) are equal.

    `key` picks which permissions count: QEMU's `info mem` ignores NX, for instance.
    """
    perms = key or (lambda leaf: (leaf.writable, leaf.user, leaf.nx))
    current: Region | None = None
    for leaf in pages:
        writable, user, nx = perms(leaf)
        if (
            current is not None
            and current.end == leaf.va
            and (current.writable, current.user, current.nx) == (writable, user, nx)
        ):
            current = Region(current.start, leaf.va + leaf.size, writable, user, nx)
            continue
        if current is not None:
            yield current
        current = Region(leaf.va, leaf.va + leaf.size, writable, user, nx)
    if current is not None:
        yield current
