"""Enumerating an address space's pages agrees with translating them one by one."""

from __future__ import annotations

import random

import pytest

from tests.unit.test_paging import K4, M2, NX, PS, RW, US, Memory, idx, map_long
from vmigdb.arch.x86_64.pagemap import Leaf, Region, canonical, leaves, regions
from vmigdb.arch.x86_64.paging import PagingMode, Translation, translate

G1 = 0x4000_0000


def check_against_translate(mem: Memory, cr3: int, mode: PagingMode, found: list[Leaf]) -> None:
    for leaf in found:
        for offset in (0, leaf.size // 2, leaf.size - 1):
            va = canonical(leaf.va + offset, mode)
            t = translate(mem.read_phys, cr3, va, mode)
            assert isinstance(t, Translation), (hex(va), t)
            assert (t.pa, t.page_size, t.writable, t.user, t.nx) == (
                leaf.pa + offset,
                leaf.size,
                leaf.writable,
                leaf.user,
                leaf.nx,
            )


def test_long4_lists_every_page_in_order_with_effective_permissions() -> None:
    mem = Memory()
    cr3 = mem.table()
    map_long(mem, cr3, 0xFFFF_8880_0000_0000, 0x4000_0000, leaf=3, flags=RW)
    map_long(mem, cr3, 0xFFFF_FFFF_8100_0000, 0x20_0000, leaf=2, flags=RW | NX)
    map_long(mem, cr3, 0x5555_5555_4000, 0x3000, flags=RW | US)
    map_long(mem, cr3, 0x5555_5555_5000, 0x9000, flags=US)
    found = list(leaves(mem.read_phys, cr3, PagingMode.LONG4))
    assert [(canonical(p.va, PagingMode.LONG4), p.pa, p.size) for p in found] == [
        (0x5555_5555_4000, 0x3000, K4),
        (0x5555_5555_5000, 0x9000, K4),
        (0xFFFF_8880_0000_0000, 0x4000_0000, G1),
        (0xFFFF_FFFF_8100_0000, 0x20_0000, M2),
    ]
    assert [(p.writable, p.user, p.nx) for p in found] == [
        (True, True, False),
        (False, True, False),
        (True, False, False),  # upper levels are RW|US: the leaf's U/S=0 wins
        (True, False, True),
    ]
    check_against_translate(mem, cr3, PagingMode.LONG4, found)


def test_upper_level_permissions_restrict_the_leaf() -> None:
    mem = Memory()
    cr3 = mem.table()
    va = 0x7F00_0000_0000
    map_long(mem, cr3, va, 0x5000, flags=RW | US)
    pml4e = mem.get(cr3, idx(va, 4))
    mem.entry(cr3, idx(va, 4), (pml4e & ~RW) | NX)  # read-only, no-execute from the top
    (leaf,) = leaves(mem.read_phys, cr3, PagingMode.LONG4)
    assert (leaf.writable, leaf.user, leaf.nx) == (False, True, True)
    check_against_translate(mem, cr3, PagingMode.LONG4, [leaf])


def test_entries_translate_refuses_are_not_listed() -> None:
    mem = Memory()
    cr3 = mem.table()
    map_long(mem, cr3, 0x4000_0000, 0x20_0000, leaf=2, flags=RW)
    map_long(mem, cr3, 0x4020_0000, 0x20_0000 | 0x2000, leaf=2, flags=RW)  # reserved bit 13
    mem.entry(cr3, 5, 0x80_0000 | 1 | PS)  # PS in a PML4E
    found = list(leaves(mem.read_phys, cr3, PagingMode.LONG4))
    assert [p.va for p in found] == [0x4000_0000]


def test_a_table_outside_ram_is_skipped() -> None:
    mem = Memory()
    cr3 = mem.table()
    mem.entry(cr3, 1, 0x7FFF_0000 | 1 | RW)  # a PDPT far beyond RAM
    map_long(mem, cr3, 0x1000, 0x6000)
    assert [p.va for p in leaves(mem.read_phys, cr3, PagingMode.LONG4)] == [0x1000]


def test_one_read_per_table() -> None:
    mem = Memory()
    cr3 = mem.table()
    for i in range(64):
        map_long(mem, cr3, 0x40_0000 + i * K4, 0x10_0000 + i * K4, flags=US)
    mem.reads.clear()
    assert len(list(leaves(mem.read_phys, cr3, PagingMode.LONG4))) == 64
    assert len(mem.reads) == 4  # PML4, PDPT, PD, PT


def test_long5() -> None:
    mem = Memory()
    cr3 = mem.table()
    va = 0xFF11_2233_4455_6000
    map_long(mem, cr3, va, 0x7000, levels=5, flags=RW)
    (leaf,) = leaves(mem.read_phys, cr3, PagingMode.LONG5)
    assert canonical(leaf.va, PagingMode.LONG5) == va and leaf.pa == 0x7000
    check_against_translate(mem, cr3, PagingMode.LONG5, [leaf])


def test_pae_and_legacy() -> None:
    mem = Memory()
    pdpt = 0x20_0000
    pd = mem.table()
    mem.entry(pdpt, 1, pd | 1)
    mem.entry(pd, 3, 0x60_0000 | 1 | RW | PS)  # 2M page at 0x40600000
    found = list(leaves(mem.read_phys, pdpt, PagingMode.PAE))
    assert [(p.va, p.pa, p.size) for p in found] == [(0x4060_0000, 0x60_0000, M2)]
    check_against_translate(mem, pdpt, PagingMode.PAE, found)

    directory = mem.table()
    table = mem.table()
    mem.entry(directory, 2, 0x40_0000 | 1 | PS | US, size=4)  # 4M page at 0x800000
    mem.entry(directory, 3, table | 1 | RW | US, size=4)
    mem.entry(table, 5, 0x9000 | 1 | RW, size=4)
    found = list(leaves(mem.read_phys, directory, PagingMode.LEGACY32))
    assert [(p.va, p.pa, p.size) for p in found] == [
        (0x80_0000, 0x40_0000, 0x40_0000),
        (0xC0_5000, 0x9000, K4),
    ]
    check_against_translate(mem, directory, PagingMode.LEGACY32, found)


def test_paging_off_has_no_pages() -> None:
    assert list(leaves(Memory().read_phys, 0, PagingMode.NONE)) == []


def test_regions_merge_neighbours_with_equal_permissions() -> None:
    pages = [
        Leaf(0x1000, 0, K4, 0, True, True, False),
        Leaf(0x2000, 0, K4, 0, True, True, False),
        Leaf(0x3000, 0, K4, 0, True, True, True),  # NX differs
        Leaf(0x5000, 0, K4, 0, True, True, True),  # a hole before it
    ]
    assert list(regions(iter(pages))) == [
        Region(0x1000, 0x3000, True, True, False),
        Region(0x3000, 0x4000, True, True, True),
        Region(0x5000, 0x6000, True, True, True),
    ]
    ignore_nx = list(regions(iter(pages), key=lambda p: (p.writable, p.user, False)))
    assert [(r.start, r.end) for r in ignore_nx] == [(0x1000, 0x4000), (0x5000, 0x6000)]


@pytest.mark.parametrize("seed", range(5))
def test_random_tables_agree_with_translate(seed: int) -> None:
    rng = random.Random(seed)
    mem = Memory(32 << 20)
    cr3 = mem.table()
    used: set[int] = set()
    for _ in range(40):
        leaf = rng.choice((1, 1, 1, 2))
        size = K4 if leaf == 1 else M2
        va = rng.randrange(0, 1 << 47, size)
        if va >> 21 in used:
            continue
        used.add(va >> 21)
        flags = rng.choice((0, RW)) | rng.choice((0, US)) | rng.choice((0, NX))
        map_long(mem, cr3, va, rng.randrange(0, 1 << 30, size), leaf=leaf, flags=flags)
    found = list(leaves(mem.read_phys, cr3, PagingMode.LONG4))
    assert [p.va for p in found] == sorted(p.va for p in found)
    check_against_translate(mem, cr3, PagingMode.LONG4, found)
