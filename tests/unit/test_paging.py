"""Tests for guest page-table walks, on page tables built by hand in a fake RAM."""

from __future__ import annotations

import pytest

from vmigdb.arch.x86_64.paging import (
    NON_CANONICAL,
    NOT_PRESENT,
    OUTSIDE_32BIT,
    OUTSIDE_RAM,
    RESERVED_BIT,
    Fault,
    PagingMode,
    PhysicalMemoryError,
    Translation,
    Translator,
    paging_mode,
    translate,
    translate_range,
)

P, RW, US, PS, NX = 1, 2, 4, 0x80, 1 << 63
K4, M2, G1 = 0x1000, 0x20_0000, 0x4000_0000
RAM_SIZE = 8 << 20  # 8 MiB of "guest RAM"


class Memory:
    """Fake guest-physical RAM plus a bump allocator for 4K page tables."""

    def __init__(self, size: int = RAM_SIZE) -> None:
        self.ram = bytearray(size)
        self.next_free = 0x10_0000  # tables live from 1 MiB; data pages are placed below
        self.reads: list[tuple[int, int]] = []

    def read_phys(self, addr: int, length: int) -> bytes:
        self.reads.append((addr, length))
        if addr < 0 or addr + length > len(self.ram):
            raise PhysicalMemoryError(f"{addr:#x}+{length:#x}")
        return bytes(self.ram[addr : addr + length])

    def table(self) -> int:
        addr = self.next_free
        self.next_free += K4
        return addr

    def entry(self, table: int, index: int, value: int, size: int = 8) -> None:
        self.ram[table + index * size : table + (index + 1) * size] = value.to_bytes(size, "little")

    def get(self, table: int, index: int, size: int = 8) -> int:
        return int.from_bytes(self.ram[table + index * size : table + (index + 1) * size], "little")


def idx(va: int, level: int) -> int:
    return (va >> (3 + 9 * level)) & 0x1FF


def map_long(
    mem: Memory, root: int, va: int, pa: int, *, levels: int = 4, leaf: int = 1, flags: int = 0
) -> None:
    """Map *va* -> *pa* with a leaf at *leaf* (1 = 4K, 2 = 2M, 3 = 1G); upper levels RW|US."""
    table = root
    for level in range(levels, leaf, -1):
        e = mem.get(table, idx(va, level))
        if not e & P:
            e = mem.table() | P | RW | US
            mem.entry(table, idx(va, level), e)
        table = e & 0x000F_FFFF_FFFF_F000
    mem.entry(table, idx(va, leaf), pa | P | (PS if leaf > 1 else 0) | flags)


@pytest.fixture
def mem() -> Memory:
    return Memory()


# ---- paging_mode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cr0", "cr4", "efer", "mode"),
    [
        (0, 0, 0, PagingMode.NONE),
        (1, 0x20, 0x500, PagingMode.NONE),  # PG clear wins over PAE/LMA bits
        (0x8000_0001, 0, 0, PagingMode.LEGACY32),
        (0x8000_0001, 0x10, 0, PagingMode.LEGACY32),  # PSE alone
        (0x8000_0001, 0x20, 0, PagingMode.PAE),
        (0x8000_0001, 0x20, 0x100, PagingMode.PAE),  # LME set but not yet active
        (0x8000_0001, 0x20, 0x500, PagingMode.LONG4),
        (0x8000_0001, 0x1020, 0x500, PagingMode.LONG5),
        (0x8000_0001, 0x1020, 0x100, PagingMode.PAE),  # LA57 ignored outside long mode
        (0x8005_0033, 0x3606E0, 0xD01, PagingMode.LONG4),  # a real Linux guest
    ],
)
def test_paging_mode(cr0: int, cr4: int, efer: int, mode: PagingMode) -> None:
    assert paging_mode(cr0, cr4, efer) is mode


# ---- 4-level ----------------------------------------------------------------------------


def test_4k_2m_1g_pages(mem: Memory) -> None:
    cr3 = mem.table()
    map_long(mem, cr3, 0xFFFF_8880_0000_0000, 0x4000_0000, leaf=3, flags=RW)
    map_long(mem, cr3, 0xFFFF_FFFF_8100_0000, 0x0020_0000, leaf=2, flags=RW | NX)
    map_long(mem, cr3, 0x0000_5555_5555_4000, 0x0000_3000, flags=RW | US)

    t = translate(mem.read_phys, cr3, 0xFFFF_8880_0123_4567, PagingMode.LONG4)
    assert t == Translation(0xFFFF_8880_0123_4567, 0x4123_4567, G1, True, False, False, 3)

    t = translate(mem.read_phys, cr3, 0xFFFF_FFFF_8112_3456, PagingMode.LONG4)
    assert t == Translation(0xFFFF_FFFF_8112_3456, 0x0032_3456, M2, True, False, True, 2)

    t = translate(mem.read_phys, cr3, 0x0000_5555_5555_4ABC, PagingMode.LONG4)
    assert t == Translation(0x0000_5555_5555_4ABC, 0x3ABC, K4, True, True, False, 1)


def test_not_present_at_each_level(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0x0000_7F00_1234_5000
    r = translate(mem.read_phys, cr3, va, PagingMode.LONG4)
    assert r == Fault(va, 4, 0, NOT_PRESENT)

    map_long(mem, cr3, va, 0x5000)
    pml4e = mem.get(cr3, idx(va, 4))
    pdpt = pml4e & ~0xFFF
    pdpte = mem.get(pdpt, idx(va, 3))
    pd = pdpte & ~0xFFF
    pde = mem.get(pd, idx(va, 2))
    pt = pde & ~0xFFF
    assert isinstance(translate(mem.read_phys, cr3, va, PagingMode.LONG4), Translation)

    # Knock out P at one level at a time; the fault names that level and its raw entry.
    for level, table in ((1, pt), (2, pd), (3, pdpt), (4, cr3)):
        saved = mem.get(table, idx(va, level))
        mem.entry(table, idx(va, level), saved & ~P | 0xABC0)
        assert translate(mem.read_phys, cr3, va, PagingMode.LONG4) == Fault(
            va, level, saved & ~P | 0xABC0, NOT_PRESENT
        )
        mem.entry(table, idx(va, level), saved)


@pytest.mark.parametrize(
    "va",
    [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0x00FF_0000_0000_0000],
)
def test_non_canonical_4_level(mem: Memory, va: int) -> None:
    cr3 = mem.table()
    assert translate(mem.read_phys, cr3, va, PagingMode.LONG4) == Fault(va, 4, 0, NON_CANONICAL)
    assert mem.reads == []  # no table was touched


def test_permission_combination(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0x0000_0040_0000_0000
    map_long(mem, cr3, va, 0x7000, flags=RW | US)
    t = translate(mem.read_phys, cr3, va, PagingMode.LONG4)
    assert (t.writable, t.user, t.nx) == (True, True, False)

    # Clear RW on the PDPTE and set NX on the PML4E: AND of RW, OR of NX.
    pml4e = mem.get(cr3, idx(va, 4))
    mem.entry(cr3, idx(va, 4), pml4e | NX)
    pdpt = pml4e & 0x000F_FFFF_FFFF_F000
    mem.entry(pdpt, idx(va, 3), mem.get(pdpt, idx(va, 3)) & ~RW)
    t = translate(mem.read_phys, cr3, va, PagingMode.LONG4)
    assert (t.writable, t.user, t.nx) == (False, True, True)

    # Clear US at the PML4E: supervisor-only.
    mem.entry(cr3, idx(va, 4), (pml4e | NX) & ~US)
    t = translate(mem.read_phys, cr3, va, PagingMode.LONG4)
    assert (t.writable, t.user, t.nx) == (False, False, True)


def test_cr3_pcid_and_noflush_bits_ignored(mem: Memory) -> None:
    cr3 = mem.table()
    map_long(mem, cr3, 0xFFFF_C900_0000_0000, 0x9000)
    for noise in (0x001, 0xFFF, 1 << 63, (1 << 63) | 0x5A5):
        t = translate(mem.read_phys, cr3 | noise, 0xFFFF_C900_0000_0010, PagingMode.LONG4)
        assert isinstance(t, Translation) and t.pa == 0x9010


def test_high_entry_bits_masked(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0x1000_0000
    map_long(mem, cr3, va, 0xA000)
    pt_entry_table = cr3
    for level in (4, 3, 2):  # find the page table
        pt_entry_table = mem.get(pt_entry_table, idx(va, level)) & 0x000F_FFFF_FFFF_F000
    # Protection key (bits 59..62) and ignored bits (52..58) must not leak into the address.
    mem.entry(pt_entry_table, idx(va, 1), 0xA000 | P | (0x7FF << 52))
    t = translate(mem.read_phys, cr3, va + 5, PagingMode.LONG4)
    assert isinstance(t, Translation) and t.pa == 0xA005 and not t.nx


def test_reserved_bits(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0x4000_0000  # PML4 0, PDPT 1
    map_long(mem, cr3, va, 0x0020_0000, leaf=2)
    pdpt = mem.get(cr3, 0) & ~0xFFF
    pd = mem.get(pdpt, 1) & ~0xFFF
    mem.entry(pd, 0, 0x0020_0000 | P | PS | (1 << 13))  # bit 13 reserved in a 2M PDE
    r = translate(mem.read_phys, cr3, va, PagingMode.LONG4)
    assert isinstance(r, Fault) and (r.level, r.reason) == (2, RESERVED_BIT)

    mem.entry(pd, 0, 0x0020_0000 | P | PS | (1 << 12))  # bit 12 is PAT: fine
    assert translate(mem.read_phys, cr3, va, PagingMode.LONG4).pa == 0x0020_0000

    mem.entry(cr3, 0, mem.get(cr3, 0) | PS)  # PS in a PML4E is reserved
    r = translate(mem.read_phys, cr3, va, PagingMode.LONG4)
    assert isinstance(r, Fault) and (r.level, r.reason) == (4, RESERVED_BIT)


def test_table_outside_ram(mem: Memory) -> None:
    cr3 = mem.table()
    mem.entry(cr3, 0, 0x40_0000_0000 | P | RW)  # PDPT far beyond our 8 MiB
    r = translate(mem.read_phys, cr3, 0x1234, PagingMode.LONG4)
    assert r == Fault(0x1234, 3, 0, OUTSIDE_RAM)
    r = translate(mem.read_phys, 0x7F00_0000_0000, 0x1234, PagingMode.LONG4)
    assert r == Fault(0x1234, 4, 0, OUTSIDE_RAM)


# ---- 5-level ------------------------------------------------------------------------------


def test_5_level(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0xFF11_2233_4455_6000  # canonical with 57 bits, not with 48
    map_long(mem, cr3, va, 0x0000_4000, levels=5, flags=RW)
    t = translate(mem.read_phys, cr3, va | 0x123, PagingMode.LONG5)
    assert t == Translation(va | 0x123, 0x4123, K4, True, False, False, 1)
    assert translate(mem.read_phys, cr3, va, PagingMode.LONG4).reason == NON_CANONICAL

    big = 0x00FF_FFFF_C000_0000  # last 1G of the 57-bit lower half
    map_long(mem, cr3, big, 0x4000_0000, levels=5, leaf=3)
    assert translate(mem.read_phys, cr3, big + 7, PagingMode.LONG5).pa == 0x4000_0007

    other = 0x0000_1000_0000_0000
    r = translate(mem.read_phys, cr3, other, PagingMode.LONG5)
    assert isinstance(r, Fault) and r.reason == NOT_PRESENT and r.level in (5, 4)

    empty = mem.table()
    assert translate(mem.read_phys, empty, 0, PagingMode.LONG5) == Fault(0, 5, 0, NOT_PRESENT)
    nc = 0x0100_0000_0000_0000
    assert translate(mem.read_phys, cr3, nc, PagingMode.LONG5) == Fault(nc, 5, 0, NON_CANONICAL)


# ---- 32-bit modes ---------------------------------------------------------------------------


def test_pae(mem: Memory) -> None:
    pdpt = mem.table()
    pd = mem.table()
    pt = mem.table()
    mem.entry(pdpt, 3, pd | P)
    mem.entry(pd, 0, pt | P | RW | US)
    mem.entry(pt, 5, 0x6000 | P | RW | US | NX)
    mem.entry(pd, 1, 0x0060_0000 | P | PS)
    t = translate(mem.read_phys, pdpt | 0x8, 0xC000_5010, PagingMode.PAE)  # low cr3 bits ignored
    assert t == Translation(0xC000_5010, 0x6010, K4, True, True, True, 1)
    t = translate(mem.read_phys, pdpt, 0xC021_0000, PagingMode.PAE)
    assert t == Translation(0xC021_0000, 0x0061_0000, M2, False, False, False, 2)
    r = translate(mem.read_phys, pdpt, 0x1000, PagingMode.PAE)
    assert r == Fault(0x1000, 3, 0, NOT_PRESENT)
    assert translate(mem.read_phys, pdpt, 1 << 32, PagingMode.PAE).reason == OUTSIDE_32BIT


def test_legacy32(mem: Memory) -> None:
    pd = mem.table()
    pt = mem.table()
    mem.entry(pd, 0x300, pt | P | RW, size=4)
    mem.entry(pt, 2, 0x3000 | P | RW | US, size=4)
    mem.entry(pd, 0x301, 0x0040_0000 | P | PS | US, size=4)
    t = translate(mem.read_phys, pd, 0xC000_2ABC, PagingMode.LEGACY32)
    assert t == Translation(0xC000_2ABC, 0x3ABC, K4, True, False, False, 1)
    t = translate(mem.read_phys, pd, 0xC041_2345, PagingMode.LEGACY32)
    assert t == Translation(0xC041_2345, 0x0041_2345, 0x40_0000, False, True, False, 2)
    r = translate(mem.read_phys, pd, 0xC000_3000, PagingMode.LEGACY32)
    assert r == Fault(0xC000_3000, 1, 0, NOT_PRESENT)
    assert all(length == 4 for _, length in mem.reads)


def test_none_mode_is_identity(mem: Memory) -> None:
    t = translate(mem.read_phys, 0, 0xB8000, PagingMode.NONE)
    assert t.pa == 0xB8000 and t.level == 0
    assert mem.reads == []
    tr = Translator(mem.read_phys)
    mem.ram[0x1FF0:0x2010] = bytes(range(0x20))
    assert tr.read_virtual(0, 0x1FF0, 0x20, PagingMode.NONE) == bytes(range(0x20))
    # One physical read: identity pages are contiguous and merge.
    assert mem.reads == [(0x1FF0, 0x20)]


def test_bad_arguments(mem: Memory) -> None:
    with pytest.raises(ValueError):
        translate(mem.read_phys, 0, -1, PagingMode.LONG4)
    with pytest.raises(ValueError):
        translate(mem.read_phys, 0, 1 << 64, PagingMode.LONG4)
    with pytest.raises(ValueError):
        list(translate_range(mem.read_phys, 0, 0, -1, PagingMode.LONG4))


# ---- ranges and the Translator -------------------------------------------------------------


def test_translate_range_boundary(mem: Memory) -> None:
    cr3 = mem.table()
    base = 0x0000_0000_0040_0000
    map_long(mem, cr3, base, 0x5000)
    map_long(mem, cr3, base + K4, 0x6000)  # contiguous with the first: merged
    map_long(mem, cr3, base + 2 * K4, 0x9000)  # not contiguous: new chunk
    chunks = list(translate_range(mem.read_phys, cr3, base + 0x800, 4 * K4, PagingMode.LONG4))
    assert chunks == [
        (base + 0x800, 0x5800, 0x1800),
        (base + 2 * K4, 0x9000, K4),
        (base + 3 * K4, None, 0x1800),
    ]
    assert sum(n for _, _, n in chunks) == 4 * K4


def test_translate_range_skips_holes_by_level(mem: Memory) -> None:
    cr3 = mem.table()
    # Nothing mapped: a 1 TiB range is one hole, found in a couple of walks.
    chunks = list(translate_range(mem.read_phys, cr3, 0x1000, 1 << 40, PagingMode.LONG4))
    assert chunks == [(0x1000, None, 1 << 40)]
    assert len(mem.reads) <= 3
    # Across the non-canonical gap to the upper half.
    va = 0x0000_7FFF_FFFF_F000
    map_long(mem, cr3, 0xFFFF_8000_0000_0000, 0x2000)
    n = len(mem.reads)
    end = 0xFFFF_8000_0000_2000
    chunks = list(translate_range(mem.read_phys, cr3, va, end - va, PagingMode.LONG4))
    assert chunks == [
        (va, None, 0xFFFF_8000_0000_0000 - va),
        (0xFFFF_8000_0000_0000, 0x2000, K4),
        (0xFFFF_8000_0000_1000, None, K4),
    ]
    assert len(mem.reads) - n <= 9


def test_translate_range_large_page_one_chunk(mem: Memory) -> None:
    cr3 = mem.table()
    map_long(mem, cr3, 0xFFFF_FFFF_8000_0000, 0x0040_0000, leaf=2)
    chunks = list(translate_range(mem.read_phys, cr3, 0xFFFF_FFFF_8000_0100, M2, PagingMode.LONG4))
    assert chunks == [
        (0xFFFF_FFFF_8000_0100, 0x0040_0100, M2 - 0x100),
        (0xFFFF_FFFF_8020_0000, None, 0x100),
    ]


def test_translate_range_empty_and_top_of_space(mem: Memory) -> None:
    cr3 = mem.table()
    assert list(translate_range(mem.read_phys, cr3, 0x1000, 0, PagingMode.LONG4)) == []
    va = 0xFFFF_FFFF_FFFF_F000
    map_long(mem, cr3, va, 0x2000)
    chunks = list(translate_range(mem.read_phys, cr3, va + 0xFF0, 0x20, PagingMode.LONG4))
    assert chunks == [(va + 0xFF0, 0x2FF0, 0x10), (1 << 64, None, 0x10)]


def test_read_virtual_noncontiguous_and_hole(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0xFFFF_C900_0001_0000
    # Three virtually consecutive pages backed by scattered physical pages, then a hole.
    for i, pa in enumerate((0x7000, 0x3000, 0x5000)):
        map_long(mem, cr3, va + i * K4, pa)
        mem.ram[pa : pa + K4] = bytes([0x10 + i]) * K4
    tr = Translator(mem.read_phys)
    data = tr.read_virtual(cr3, va + 0xFF8, 3 * K4, PagingMode.LONG4)
    assert data == b"\x10" * 8 + b"\x11" * K4 + b"\x12" * K4
    assert tr.read_virtual(cr3, va + 3 * K4, 16, PagingMode.LONG4) == b""
    assert tr.read_virtual(cr3, va + 0x10, 0x20, PagingMode.LONG4) == b"\x10" * 0x20
    assert tr.read_virtual(cr3, va, 0, PagingMode.LONG4) == b""


def test_read_virtual_stops_outside_ram(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0x0000_0000_1000_0000
    top = RAM_SIZE - K4
    map_long(mem, cr3, va, top)  # last RAM page
    map_long(mem, cr3, va + K4, RAM_SIZE)  # contiguous, but beyond RAM
    mem.ram[top:] = b"\xaa" * K4
    tr = Translator(mem.read_phys)
    assert tr.read_virtual(cr3, va + 0xF00, 0x200, PagingMode.LONG4) == b"\xaa" * 0x100


def test_translator_cache_and_flush(mem: Memory) -> None:
    cr3 = mem.table()
    va = 0x0000_0000_0800_0000
    map_long(mem, cr3, va, 0x4000)
    tr = Translator(mem.read_phys)
    t = tr.translate(cr3, va + 0x10, PagingMode.LONG4)
    assert t == Translation(va + 0x10, 0x4010, K4, False, False, False, 1)
    n = len(mem.reads)
    assert tr.translate(cr3, va + 0x20, PagingMode.LONG4).pa == 0x4020
    assert len(mem.reads) == n  # served from cache

    # Remap behind the cache's back: stale until flush().
    pt = cr3
    for level in (4, 3, 2):
        pt = mem.get(pt, idx(va, level)) & 0x000F_FFFF_FFFF_F000
    mem.entry(pt, idx(va, 1), 0x6000 | P)
    assert tr.translate(cr3, va, PagingMode.LONG4).pa == 0x4000
    tr.flush()
    assert tr.translate(cr3, va, PagingMode.LONG4).pa == 0x6000

    # Faults are cached too, with the asked-for va.
    assert tr.translate(cr3, 0x1234, PagingMode.LONG4) == Fault(0x1234, 2, 0, NOT_PRESENT)
    n = len(mem.reads)
    assert tr.translate(cr3, 0x1238, PagingMode.LONG4) == Fault(0x1238, 2, 0, NOT_PRESENT)
    assert len(mem.reads) == n

    # A different cr3 is a different key.
    other = mem.table()
    assert isinstance(tr.translate(other, va, PagingMode.LONG4), Fault)


def test_translator_cache_bounded(mem: Memory) -> None:
    from vmigdb.arch.x86_64 import paging

    tr = Translator(mem.read_phys)
    for page in range(paging._CACHE_LIMIT + 10):
        tr.translate(0, page << 12, PagingMode.NONE)
    assert len(tr._cache) <= paging._CACHE_LIMIT
