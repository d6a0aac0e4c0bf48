"""kallsyms decoding over synthetic tables encoded here the way scripts/kallsyms.c does.

A fake kernel image gets a token table (every character used is its own token, a few multi-char
tokens fill unused byte values, the rest are empty), token-compressed names with v6.1 ULEB128
lengths, markers, seqs_of_names and base-relative offsets, in the pre-6.4 and the v6.4+ layouts.
Each set is decoded through VMCOREINFO's SYMBOL(kallsyms_*) and again by scanning the image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.guest.linux.kallsyms import (
    KallsymsNotFound,
    Symbol,
    SymbolTable,
    locate_kallsyms,
    read_kallsyms,
)
from vmigdb.guest.linux.kernel import START_KERNEL_MAP, KernelMemory, LinuxKernel

U64 = (1 << 64) - 1
RAM_SIZE = 16 << 20
OFFSET = 0x1C00_0000
TEXT = 0xFFFF_FFFF_8100_0000 + OFFSET
LOAD_PA = 0x40_0000
PHYS_BASE = (LOAD_PA - (TEXT - START_KERNEL_MAP)) & U64
RELEASE = "6.1.0-99-test-amd64"
BANNER = TEXT + 0x8_0000
TABLES = TEXT + 0x10_0000  # where the kallsyms tables start
EXTRA_TOKENS = ("fn_", "__x64_sys_", "data_", "idle", "de", "_b")
LONG_NAME = "long_" + "q" * 195  # 201 tokens: a two-byte (ULEB128) length


def symbol_list(*, absolute_percpu: bool = True) -> list[Symbol]:
    """~900 symbols in kallsyms order (sorted by address), with aliases and per-CPU ones."""
    syms = []
    if absolute_percpu:
        syms += [
            Symbol("fixed_percpu_data", 0, "A"),
            Symbol("__per_cpu_start", 0, "A"),
            Symbol("cpu_tss_rw", 0x6000, "A"),
        ]
    syms += [Symbol("_text", TEXT, "T"), Symbol("_stext", TEXT, "T")]
    addr = TEXT + 0x40
    for i in range(600):
        syms.append(Symbol(f"fn_{i:04d}", addr, "t" if i % 3 else "T"))
        addr += 0x30 + i % 7 * 0x10
    syms.append(Symbol("default_idle", addr, "T"))
    syms.append(Symbol("__x64_sys_getpid", addr + 0x40, "T"))
    syms.append(Symbol(LONG_NAME, addr + 0x80, "t"))
    syms.append(Symbol("dup", addr + 0xC0, "t"))  # a local "dup" before the global one
    syms.append(Symbol("linux_banner", BANNER, "D"))
    addr = BANNER + 0x100
    for i in range(300):
        syms.append(Symbol(f"data_{i:03d}", addr, "d" if i % 2 else "D"))
        addr += 8
    syms.append(Symbol("dup", addr, "D"))
    syms.append(Symbol("dup_alias", addr, "d"))
    syms.append(Symbol("_end", addr + 0x1000, "B"))
    return syms


@dataclass
class Built:
    """Encoded kallsyms: where each table landed in the image."""

    names: int
    num_syms: int
    token_table: int
    token_index: int
    offsets: int
    relative_base: int


def tokens_for(entries: list[str]) -> list[str]:
    table = [""] * 256
    for c in {c for e in entries for c in e}:
        table[ord(c)] = c
    free = [i for i in range(256) if not table[i]]
    for token, i in zip(EXTRA_TOKENS, reversed(free), strict=False):
        table[i] = token
    return table


def encode(entry: str, table: list[str]) -> bytes:
    """Greedy longest-token encoding."""
    by_len = sorted((t for t in table if t), key=len, reverse=True)
    out = bytearray()
    pos = 0
    while pos < len(entry):
        token = next(t for t in by_len if entry.startswith(t, pos))
        out.append(table.index(token))
        pos += len(token)
    return bytes(out)


def align8(n: int) -> int:
    return (n + 7) & ~7


class Image:
    """Fake RAM with a kernel image at LOAD_PA, read through LinuxKernel's image mapping."""

    def __init__(self) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.put(BANNER, f"Linux version {RELEASE} (gcc) #1 SMP\n\0".encode())

    def put(self, va: int, data: bytes) -> None:
        pa = (va - START_KERNEL_MAP + PHYS_BASE) & U64
        self.ram[pa : pa + len(data)] = data

    def read_phys(self, pa: int, length: int) -> bytes:
        if pa < 0 or pa + length > len(self.ram):
            err = PhysicalMemoryError(pa)
            err.address = max(pa, len(self.ram))  # type: ignore[attr-defined]
            raise err
        return bytes(self.ram[pa : pa + length])

    def build(
        self,
        syms: list[Symbol],
        *,
        layout: str = "6.1",
        absolute_percpu: bool = True,
        legacy_lengths: bool = False,
    ) -> Built:
        entries = [s.type + s.name for s in syms]
        table = tokens_for(entries)
        names = bytearray()
        markers = []
        for i, entry in enumerate(entries):
            if i % 256 == 0:
                markers.append(len(names))
            code = encode(entry, table)
            n = len(code)
            if n <= 0x7F or legacy_lengths:
                names.append(n)
            else:
                names += bytes(((n & 0x7F) | 0x80, n >> 7))
            names += code
        token_table = b"".join(t.encode() + b"\0" for t in table)
        index, off = [], 0
        for t in table:
            index.append(off)
            off += len(t) + 1
        base = min(s.address for s in syms if s.address >> 63)
        offsets = []
        for s in syms:
            if not absolute_percpu:
                offsets.append(s.address - base)
            elif s.type == "A":
                offsets.append(s.address)
            else:
                offsets.append(base - 1 - s.address)
        count = len(syms)
        parts = {
            "offsets": struct.pack(f"<{count}{'i' if absolute_percpu else 'I'}", *offsets),
            "relative_base": struct.pack("<Q", base),
            "num_syms": struct.pack("<I", count),
            "names": bytes(names),
            "markers": struct.pack(f"<{len(markers)}I", *markers),
            "seqs": bytes(3 * count),
            "token_table": token_table,
            "token_index": struct.pack("<256H", *index),
        }
        if layout == "6.1":  # scripts/kallsyms.c output order before v6.4
            order = ["offsets", "relative_base", "num_syms", "names", "markers", "seqs"]
            order += ["token_table", "token_index"]
        else:  # v6.4+, commit 404bad70fcf7
            order = ["num_syms", "names", "markers", "token_table", "token_index", "offsets"]
            order += ["relative_base", "seqs"]
        where, va = {}, TABLES
        for label in order:
            where[label] = va
            self.put(va, parts[label])
            va = align8(va + len(parts[label]))
        return Built(
            where["names"],
            where["num_syms"],
            where["token_table"],
            where["token_index"],
            where["offsets"],
            where["relative_base"],
        )


def kernel_for(
    built: Built | None, *, relative_base: bool = True, stext: int = TEXT
) -> LinuxKernel:
    info = {"OSRELEASE": RELEASE, "SYMBOL(_stext)": f"{stext:x}"}
    if built is not None:
        info |= {
            "SYMBOL(kallsyms_names)": f"{built.names:x}",
            "SYMBOL(kallsyms_num_syms)": f"{built.num_syms:x}",
            "SYMBOL(kallsyms_token_table)": f"{built.token_table:x}",
            "SYMBOL(kallsyms_token_index)": f"{built.token_index:x}",
            "SYMBOL(kallsyms_offsets)": f"{built.offsets:x}",
        }
        if relative_base:
            info["SYMBOL(kallsyms_relative_base)"] = f"{built.relative_base:x}"
    return LinuxKernel(
        release=RELEASE,
        kaslr_offset=OFFSET,
        phys_base=PHYS_BASE,
        page_offset_base=0xFFFF_8880_0000_0000,
        kernel_cr3=0,
        vmcoreinfo=info,
    )


def decode(image: Image, kernel: LinuxKernel) -> tuple[str, list[Symbol]]:
    mem = KernelMemory(image.read_phys, kernel)
    symbols = read_kallsyms(mem, kernel)
    return locate_kallsyms(mem, kernel).source, symbols


# ---- decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["6.1", "6.4"])
@pytest.mark.parametrize("found_by", ["vmcoreinfo", "scan"])
def test_decode(layout: str, found_by: str) -> None:
    image = Image()
    syms = symbol_list()
    built = image.build(syms, layout=layout)
    source, decoded = decode(image, kernel_for(built if found_by == "vmcoreinfo" else None))
    assert source == found_by
    assert decoded == syms


def test_decode_relative_offsets_without_absolute_percpu() -> None:
    """v6.15+: no per-CPU absolute symbols, offsets are unsigned from the relative base."""
    image = Image()
    syms = symbol_list(absolute_percpu=False)
    built = image.build(syms, layout="6.4", absolute_percpu=False)
    assert decode(image, kernel_for(built))[1] == syms
    assert decode(image, kernel_for(None))[1] == syms


def test_decode_derives_the_base_from_stext() -> None:
    """A VMCOREINFO without SYMBOL(kallsyms_relative_base): the base comes from _stext."""
    image = Image()
    syms = symbol_list()
    built = image.build(syms)
    assert decode(image, kernel_for(built, relative_base=False))[1] == syms


def test_decode_one_byte_lengths_of_older_kernels() -> None:
    """Before v6.1 a length byte >= 0x80 is a plain length; the markers tell the two apart."""
    image = Image()
    syms = symbol_list()
    syms = [Symbol("x" + "y" * 126, s.address, "t") if s.name == LONG_NAME else s for s in syms]
    built = image.build(syms, legacy_lengths=True)  # that name encodes to exactly 128 tokens
    assert decode(image, kernel_for(built))[1] == syms


def test_decode_is_cached_per_memory_and_kernel() -> None:
    image = Image()
    built = image.build(symbol_list())
    kernel = kernel_for(built)
    mem = KernelMemory(image.read_phys, kernel)
    first = read_kallsyms(mem, kernel)
    image.ram[:] = bytes(len(image.ram))  # wipe memory: a second decode would fail
    assert read_kallsyms(mem, kernel) == first
    assert read_kallsyms(mem, kernel) is not first  # a fresh list each time


def test_rejects_tables_that_disagree_with_stext() -> None:
    image = Image()
    built = image.build(symbol_list())
    with pytest.raises(KallsymsNotFound, match="_stext"):
        decode(image, kernel_for(built, stext=TEXT + 0x20_0000))


def test_rejects_a_banner_for_another_release() -> None:
    image = Image()
    built = image.build(symbol_list())
    image.put(BANNER, b"Linux version 5.10.0-1-amd64 (gcc) #1 SMP\n\0")
    with pytest.raises(KallsymsNotFound, match="linux_banner"):
        decode(image, kernel_for(built))


def test_a_broken_vmcoreinfo_pointer_falls_back_to_the_scan() -> None:
    image = Image()
    syms = symbol_list()
    built = image.build(syms)
    built.names += 8  # wrong SYMBOL(kallsyms_names)
    source, decoded = decode(image, kernel_for(built))
    assert (source, decoded) == ("scan", syms)


def test_no_tables_at_all() -> None:
    with pytest.raises(KallsymsNotFound):
        decode(Image(), kernel_for(None))


# ---- SymbolTable -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> SymbolTable:
    return SymbolTable(symbol_list())


def test_symbol_table_lookup(table: SymbolTable) -> None:
    assert len(table) == len(symbol_list())
    assert list(table) == symbol_list()
    assert table.lookup("default_idle").type == "T"  # type: ignore[union-attr]
    assert table.lookup("nope") is None
    dup = table.lookup("dup")
    assert dup is not None and dup.type == "D"  # the global one, though the local comes first
    assert table.lookup("fn_0001") == Symbol("fn_0001", table.address("fn_0001"), "t")
    with pytest.raises(KeyError, match="nope"):
        table.address("nope")


def test_symbol_table_symbolize(table: SymbolTable) -> None:
    idle = table.address("default_idle")
    assert table.symbolize(idle + 11) == (table.lookup("default_idle"), 11)
    assert table.symbolize(idle) == (table.lookup("default_idle"), 0)
    # Aliases: the first in kallsyms order, as the kernel's own kallsyms_lookup() does.
    assert table.symbolize(TEXT + 4) == (table.lookup("_text"), 4)
    dup = table.lookup("dup")
    assert table.symbolize(dup.address + 1)[0] is dup  # type: ignore[union-attr,index]
    # Outside [first kernel symbol, _end): nothing, and per-CPU offsets are not addresses.
    assert table.symbolize(TEXT - 1) is None
    assert table.symbolize(table.address("_end")) is None
    assert table.symbolize(table.address("_end") - 1)[0].name == "dup"  # type: ignore[index]
    assert table.symbolize(0x6000) is None


def test_symbol_table_sorts_unsorted_input() -> None:
    syms = symbol_list()
    t = SymbolTable(list(reversed(syms)))
    assert [s.address for s in t] == sorted(s.address for s in syms)
    assert SymbolTable([]).symbolize(TEXT) is None
