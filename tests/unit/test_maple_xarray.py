"""The kernel's two index trees read out of synthetic guest memory: a maple tree (an mm's VMAs)
and an XArray (a file's page cache), with BTF laid out as Linux 6.1 has them."""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_linux_tasks import BtfWriter, FakeMemory
from vmigdb.guest.base import GuestError
from vmigdb.guest.linux import maple, pagecache
from vmigdb.guest.linux.kallsyms import Symbol, SymbolTable

NODES = 0xFFFF_8880_0100_0000  # where the synthetic nodes live (256-byte aligned)
TREE = 0xFFFF_8880_0200_0000
VMEMMAP = 0xFFFF_EA00_0000_0000
LEAF_64, RANGE_64, ARANGE_64 = 1, 2, 3


class Memory(FakeMemory):
    def u8(self, va: int) -> int:
        return self.read(va, 1)[0]


class Guest:
    def __init__(self, memory: Memory, symbols: list[Symbol]) -> None:
        self.memory = memory
        self.btf = build_btf()
        self.symbols = SymbolTable(symbols)


def build_btf():
    from vmigdb.guest.linux.btf import Btf

    w = BtfWriter()
    int_ = w.int_("int", 4)
    uchar = w.int_("unsigned char", 1)
    ulong = w.int_("unsigned long", 8)
    void_p = w.ptr()
    w.enum("maple_type", {"maple_dense": 0, "maple_leaf_64": 1, "maple_range_64": 2,
                          "maple_arange_64": 3})  # fmt: skip
    w.struct("maple_tree", 24, [("ma_flags", int_, 4), ("ma_root", void_p, 8)])
    w.struct("maple_node", 256, [("parent", void_p, 0)])
    w.struct(
        "maple_range_64",
        256,
        [("parent", void_p, 0), ("pivot", w.array(ulong, int_, 15), 8),
         ("slot", w.array(void_p, int_, 16), 128)],
    )  # fmt: skip
    w.struct(
        "maple_arange_64",
        248,
        [("parent", void_p, 0), ("pivot", w.array(ulong, int_, 9), 8),
         ("slot", w.array(void_p, int_, 10), 80), ("gap", w.array(ulong, int_, 10), 160)],
    )  # fmt: skip
    xarray = w.struct("xarray", 16, [("xa_flags", int_, 4), ("xa_head", void_p, 8)])
    w.struct(
        "xa_node",
        576,
        [("shift", uchar, 0), ("offset", uchar, 1), ("slots", w.array(void_p, int_, 64), 40)],
    )
    w.struct("address_space", 64, [("host", void_p, 0), ("i_pages", xarray, 8)])
    w.struct("file", 232, [("f_mapping", void_p, 216)])
    w.struct("page", 64, [("flags", ulong, 0), ("index", ulong, 32)])
    w.struct("vm_special_mapping", 32, [("name", void_p, 0), ("pages", void_p, 8)])
    return Btf.parse(w.blob())


def enode(address: int, kind: int, root: bool = False) -> int:
    return address | kind << 3 | 4 | (2 if root else 0)


def range_node(pivots: list[int], slots: list[int]) -> bytes:
    return struct.pack("<Q15Q16Q", 0, *(pivots + [0] * (15 - len(pivots))),
                       *(slots + [0] * (16 - len(slots))))  # fmt: skip


def arange_node(pivots: list[int], slots: list[int]) -> bytes:
    body = struct.pack("<Q9Q10Q", 0, *(pivots + [0] * (9 - len(pivots))),
                       *(slots + [0] * (10 - len(slots))))  # fmt: skip
    return body + bytes(256 - len(body))


def test_a_two_level_maple_tree_in_index_order() -> None:
    mem = Memory()
    vma = [0xFFFF_8880_0300_0000 + 0x100 * i for i in range(6)]
    left, right = NODES + 0x100, NODES + 0x200
    # Leaves: (first, last] ranges; a NULL slot is a gap, a pivot of 0 ends the data.
    mem.write(left, range_node([0x3FFF, 0x4FFF, 0x7FFF, 0x8FFF], [0, vma[0], 0, vma[1], 0]))
    mem.write(right, range_node([0x7F00_0000_0FFF, 0x7F00_0000_2FFF, 0xFFFF_FFFF_FFFF_FFFF],
                                [0, vma[2], vma[3]]))  # fmt: skip
    mem.write(NODES, arange_node([0x9FFF, 0xFFFF_FFFF_FFFF_FFFF],
                                 [enode(left, LEAF_64), enode(right, LEAF_64)]))  # fmt: skip
    mem.write(TREE, struct.pack("<IIQ", 0, 0, enode(NODES, ARANGE_64, root=True)))
    guest = Guest(mem, [])
    found = list(maple.maple_entries(guest, TREE))  # type: ignore[arg-type]
    assert found == [
        (0x4000, 0x4FFF, vma[0]),
        (0x8000, 0x8FFF, vma[1]),
        (0x7F00_0000_1000, 0x7F00_0000_2FFF, vma[2]),
        (0x7F00_0000_3000, 0xFFFF_FFFF_FFFF_FFFF, vma[3]),
    ]


def test_a_corrupted_maple_tree_is_an_error_not_a_loop() -> None:
    mem = Memory()
    mem.write(NODES, arange_node([0xFFFF_FFFF_FFFF_FFFF], [enode(NODES, ARANGE_64)]))  # itself
    mem.write(TREE, struct.pack("<IIQ", 0, 0, enode(NODES, ARANGE_64, root=True)))
    with pytest.raises(GuestError, match="more than"):
        list(maple.maple_entries(Guest(mem, []), TREE))  # type: ignore[arg-type]
    mem.write(TREE, struct.pack("<IIQ", 0, 0, enode(NODES, 9, root=True)))  # no such type
    with pytest.raises(GuestError, match="unknown type"):
        list(maple.maple_entries(Guest(mem, []), TREE))  # type: ignore[arg-type]


def xa_node(shift: int, slots: dict[int, int]) -> bytes:
    body = bytearray(576)
    body[0] = shift
    for index, value in slots.items():
        struct.pack_into("<Q", body, 40 + 8 * index, value)
    return bytes(body)


def test_page_cache_lookup_through_xarray_nodes() -> None:
    mem = Memory()
    mem.write(0xFFFF_FFFF_8200_0000, struct.pack("<Q", VMEMMAP))  # the vmemmap_base variable
    symbols = [Symbol("vmemmap_base", 0xFFFF_FFFF_8200_0000, "D")]
    file, mapping = 0xFFFF_8880_0400_0000, 0xFFFF_8880_0500_0000
    top, low = 0xFFFF_8880_0600_0000, 0xFFFF_8880_0600_1000
    page = VMEMMAP + 0x1234 * 64  # the struct page of frame 0x1234
    mem.write(page, struct.pack("<QQQQQ", 0, 0, 0, 0, 65))  # index 65
    mem.write(low, xa_node(0, {1: page, 2: 0x2D1}))  # 2: a value entry (swapped/shadow)
    mem.write(top, xa_node(6, {1: low + 2}))
    mem.write(mapping, struct.pack("<QIIQ", 0, 0, 0, top + 2))
    mem.write(file, bytes(216) + struct.pack("<Q", mapping))
    guest = Guest(mem, symbols)
    assert pagecache.file_page(guest, file, 65) == 0x1234 * 0x1000  # type: ignore[arg-type]
    assert pagecache.file_page(guest, file, 66) is None  # type: ignore[arg-type]
    assert pagecache.file_page(guest, file, 64) is None  # type: ignore[arg-type]
    assert pagecache.file_page(guest, file, 64 * 64 + 1) is None  # type: ignore[arg-type]
