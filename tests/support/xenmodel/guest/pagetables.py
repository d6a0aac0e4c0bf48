"""Builds 4-level x86-64 page tables inside a guest image's physical pages.

Tables are allocated from a caller-supplied frame allocator and written into the image's page
dictionary; several roots (CR3 values) can share subtrees, as two processes share a kernel half.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from tests.support.xenmodel.guest.x86 import PAGE, PTE_ADDR, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W

LEVEL_SHIFTS = (39, 30, 21, 12)  # PML4, PDPT, PD, PT


class PageTables:
    """Page-table trees in `pages` (gfn -> bytearray), one root per address space."""

    def __init__(self, pages: dict[int, bytearray], alloc_frame: Callable[[], int]) -> None:
        self._pages = pages
        self._alloc = alloc_frame

    def new_root(self) -> int:
        """A new empty PML4; returns its physical address (the CR3 value)."""
        return self._table()

    def share_slot(self, dst_root: int, src_root: int, va: int) -> None:
        """Make `dst_root` use the same PDPT as `src_root` for the 512 GiB slot holding `va`."""
        index = (va >> 39) & 0x1FF
        self._write(dst_root, index, self._read(src_root, index))

    def map_4k(self, root: int, va: int, pa: int, *, writable: bool, user: bool, nx: bool) -> None:
        table = self._walk_create(root, va, levels=3, user=user)
        self._write(table, (va >> 12) & 0x1FF, self._leaf(pa, writable, user, nx, large=False))

    def map_2m(self, root: int, va: int, pa: int, *, writable: bool, user: bool, nx: bool) -> None:
        assert va % (2 << 20) == 0 and pa % (2 << 20) == 0
        table = self._walk_create(root, va, levels=2, user=user)
        self._write(table, (va >> 21) & 0x1FF, self._leaf(pa, writable, user, nx, large=True))

    def _walk_create(self, root: int, va: int, levels: int, user: bool) -> int:
        table = root
        for shift in LEVEL_SHIFTS[:levels]:
            index = (va >> shift) & 0x1FF
            entry = self._read(table, index)
            if not entry & PTE_P:
                entry = self._table() | PTE_P | PTE_W
            if user:
                entry |= PTE_U  # upper levels must allow what the leaf allows
            self._write(table, index, entry)
            table = entry & PTE_ADDR
        return table

    @staticmethod
    def _leaf(pa: int, writable: bool, user: bool, nx: bool, large: bool) -> int:
        entry = pa | PTE_P
        entry |= PTE_W if writable else 0
        entry |= PTE_U if user else 0
        entry |= PTE_NX if nx else 0
        entry |= PTE_PS if large else 0
        return entry

    def _table(self) -> int:
        gfn = self._alloc()
        self._pages[gfn] = bytearray(PAGE)
        return gfn * PAGE

    def _read(self, table_pa: int, index: int) -> int:
        return struct.unpack_from("<Q", self._pages[table_pa // PAGE], index * 8)[0]

    def _write(self, table_pa: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self._pages[table_pa // PAGE], index * 8, value)
