"""The demo guest image: physical pages, initial vCPU states and symbols.

Physical layout (gfn):                       Virtual layout:
  0x01..   page tables (allocated in order)    TEXT_BASE + pa   kernel alias, 4K pages with
  0x10     GDTs and TSSs (one per vCPU)                          per-page R/W/X (pa < 2 MiB)
  0x11     IDT                                 DIRECT_BASE + pa  direct map of all RAM, 2M pages,
  0x20     kernel text (loops, func, checksum)                   RW, NX
  0x21     kernel entry (handlers, syscall)    0x400000  user text (both address spaces)
  0x22     JIT page (written, then executed)   0x600000  user data (A: 0x41, B: 0x42)
  0x30     data (counters, switches)           0x7ff000  user stack (A: 0x43, B: 0x44)
                                               (user data: +0 counter, +8 int3 switch)
  0x38..   kernel stacks, 0x3c.. ring-0 stacks
  0x40..   user text, data and stacks

Two address spaces: cr3_a and cr3_b share the kernel half and the user text page; their user
data and stack pages differ. vCPU0 starts in A, vCPU1 too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from tests.support.xenmodel.guest import programs
from tests.support.xenmodel.guest.pagetables import PageTables
from tests.support.xenmodel.guest.x86 import (
    CR0_LONG,
    CR4_LONG,
    EFER_LONG,
    FMASK_VALUE,
    KERNEL_CS,
    KERNEL_DS,
    MSR_FMASK,
    MSR_LSTAR,
    MSR_STAR,
    PAGE,
    RFLAGS_FIXED,
    STAR_VALUE,
    TSS_SEL,
    VEC_BP,
    VEC_DB,
    build_gdt,
    build_tss,
    gate_descriptor,
)

TEXT_BASE = 0xFFFF_FFFF_8000_0000
DIRECT_BASE = 0xFFFF_8880_0000_0000
RAM_PAGES = 0x400  # 4 MiB

GDT_GFN, IDT_GFN = 0x10, 0x11
KTEXT_GFN, KENTRY_GFN, JIT_GFN = 0x20, 0x21, 0x22
DATA_GFN = 0x30
KSTACK_GFNS = ((0x38, 0x39), (0x3A, 0x3B))
RSP0_GFNS = (0x3C, 0x3D)
UTEXT_GFN = 0x40
UDATA_GFNS = (0x41, 0x42)
USTACK_GFNS = (0x43, 0x44)
USER_TEXT_VA, USER_DATA_VA, USER_STACK_VA = 0x40_0000, 0x60_0000, 0x7F_F000
PER_VCPU_GDT = 0x800  # each vCPU has its own GDT (TSS busy bit) and TSS in the GDT page

# The data page: name -> number of qwords. Arrays of 8 are indexed by vCPU (r15).
DATA_LAYOUT: tuple[tuple[str, int], ...] = (
    ("iterations", 8), ("func_calls", 8), ("sum_last", 8), ("sum_mismatch", 8), ("sum_runs", 8),
    ("saved_rsp", 8), ("sum_expected", 1), ("sum_start", 1), ("sum_len", 1),
    ("bp_count", 1), ("bp_last_rip", 1), ("db_count", 1), ("db_last_rip", 1),
    ("unexpected_count", 1), ("unexpected_vector", 1), ("jit_seq", 1), ("jit_result", 1),
    ("lstar_writes", 1), ("user_rounds", 1),
    ("cfg_checksum", 1), ("cfg_jit", 1), ("cfg_int3", 1), ("cfg_int3_mask", 1),
    ("cfg_lstar", 1), ("cfg_lstar_mask", 1), ("cfg_user", 1),
)


@dataclass(frozen=True)
class Symbol:
    va: int
    pa: int


@dataclass
class VcpuInit:
    """Initial architectural state of one vCPU (long mode, ring 0)."""

    rip: int
    rsp: int
    cr3: int
    gdt: tuple[int, int]
    idt: tuple[int, int]
    tr: tuple[int, int, int]  # selector, base, limit
    gprs: dict[str, int] = field(default_factory=dict)
    cr0: int = CR0_LONG
    cr4: int = CR4_LONG
    efer: int = EFER_LONG
    rflags: int = RFLAGS_FIXED
    cs: int = KERNEL_CS
    ss: int = KERNEL_DS
    msrs: dict[int, int] = field(default_factory=dict)


@dataclass
class GuestImage:
    ram_pages: int
    pages: dict[int, bytes]
    vcpus: list[VcpuInit]
    symbols: dict[str, Symbol]
    cr3_a: int
    cr3_b: int

    def sym(self, name: str) -> Symbol:
        return self.symbols[name]


def checksum(data: bytes) -> int:
    """The guest's checksum routine, in Python: rotate left 7 and add, over little-endian qwords."""
    total = 0
    for (qword,) in struct.iter_unpack("<Q", data):
        total = (((total << 7) | (total >> 57)) + qword) & 0xFFFF_FFFF_FFFF_FFFF
    return total


def text_va(pa: int) -> int:
    return TEXT_BASE + pa


def build_demo_image(vcpus: int = 2, **switches: int) -> GuestImage:
    """Build the demo guest; `switches` set cfg_* words (e.g. checksum=1, user=1, int3_mask=15)."""
    if vcpus not in (1, 2):
        raise ValueError("the demo guest has one or two vCPUs")
    pages: dict[int, bytearray] = {}
    symbols = _data_symbols()
    _page_tables(pages, symbols)
    addr = {name: sym.va for name, sym in symbols.items()}
    addr |= {"MSR_LSTAR": MSR_LSTAR, "jit_page": text_va(JIT_GFN * PAGE),
             "user_stack_top": USER_STACK_VA + PAGE, "user_data": USER_DATA_VA,
             "cr3_a": symbols["cr3_a"].pa, "cr3_b": symbols["cr3_b"].pa}
    # Entry page first: the text page jumps to syscall_entry; the user page is independent.
    _assemble(pages, symbols, addr, KENTRY_GFN, programs.KERNEL_ENTRY, programs.KERNEL_ENTRY_EXPORTS,
              text_va)
    _assemble(pages, symbols, addr, UTEXT_GFN, programs.USER_TEXT, programs.USER_TEXT_EXPORTS,
              lambda pa: USER_TEXT_VA + pa - UTEXT_GFN * PAGE)
    _assemble(pages, symbols, addr, KTEXT_GFN, programs.KERNEL_TEXT, programs.KERNEL_TEXT_EXPORTS,
              text_va)
    stubs = _unexpected_stubs(pages, addr)
    _descriptor_tables(pages, stubs, addr, vcpus)
    _init_data(pages, symbols, switches)
    inits = [_vcpu_init(cpu, symbols) for cpu in range(vcpus)]
    return GuestImage(RAM_PAGES, {gfn: bytes(page) for gfn, page in pages.items()}, inits,
                      symbols, symbols["cr3_a"].pa, symbols["cr3_b"].pa)


def _data_symbols() -> dict[str, Symbol]:
    symbols: dict[str, Symbol] = {}
    offset = 0
    for name, count in DATA_LAYOUT:
        pa = DATA_GFN * PAGE + offset
        symbols[name] = Symbol(text_va(pa), pa)
        offset += 8 * count
    assert offset <= PAGE
    return symbols


def _page_tables(pages: dict[int, bytearray], symbols: dict[str, Symbol]) -> None:
    next_gfn = iter(range(0x01, GDT_GFN))
    tables = PageTables(pages, lambda: next(next_gfn))
    cr3_a, cr3_b = tables.new_root(), tables.new_root()
    for gfn in range(0, 0x200):  # the kernel alias: text RX, JIT RWX, the rest RW NX
        text = gfn in (KTEXT_GFN, KENTRY_GFN)
        tables.map_4k(cr3_a, text_va(gfn * PAGE), gfn * PAGE, writable=not text, user=False,
                      nx=not (text or gfn == JIT_GFN))
    for base in range(0, RAM_PAGES * PAGE, 2 << 20):
        tables.map_2m(cr3_a, DIRECT_BASE + base, base, writable=True, user=False, nx=True)
    tables.share_slot(cr3_b, cr3_a, TEXT_BASE)
    tables.share_slot(cr3_b, cr3_a, DIRECT_BASE)
    for root, data, stack in ((cr3_a, UDATA_GFNS[0], USTACK_GFNS[0]),
                              (cr3_b, UDATA_GFNS[1], USTACK_GFNS[1])):
        tables.map_4k(root, USER_TEXT_VA, UTEXT_GFN * PAGE, writable=False, user=True, nx=False)
        tables.map_4k(root, USER_DATA_VA, data * PAGE, writable=True, user=True, nx=True)
        tables.map_4k(root, USER_STACK_VA, stack * PAGE, writable=True, user=True, nx=True)
    symbols["cr3_a"] = Symbol(0, cr3_a)
    symbols["cr3_b"] = Symbol(0, cr3_b)
    symbols["user_data_a"] = Symbol(USER_DATA_VA, UDATA_GFNS[0] * PAGE)
    symbols["user_data_b"] = Symbol(USER_DATA_VA, UDATA_GFNS[1] * PAGE)
    symbols["user_int3_a"] = Symbol(USER_DATA_VA + 8, UDATA_GFNS[0] * PAGE + 8)  # switches
    symbols["user_int3_b"] = Symbol(USER_DATA_VA + 8, UDATA_GFNS[1] * PAGE + 8)


def _assemble(pages, symbols, addr, gfn, source, exports, va_of) -> None:
    base_va = va_of(gfn * PAGE)
    text = "\n".join(line.split("#")[0] for line in source.format(**addr).splitlines())
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(text, base_va)[0])
    if len(code) > PAGE:
        raise ValueError(f"program for gfn {gfn:#x} does not fit in a page")
    table = struct.unpack_from(f"<{len(exports)}Q", code, len(code) - 8 * len(exports))
    for name, va in zip(exports, table, strict=True):
        symbols[name] = Symbol(va, gfn * PAGE + va - base_va)
        addr[name] = va
    symbols[f"page_{gfn:#x}"] = Symbol(base_va, gfn * PAGE)
    pages[gfn] = bytearray(code.ljust(PAGE, b"\xcc" if gfn != UTEXT_GFN else b"\0"))


def _unexpected_stubs(pages: dict[int, bytearray], addr: dict[str, int]) -> list[int]:
    """Append one stub per vector to the entry page; returns their addresses."""
    page = pages[KENTRY_GFN]
    end = page.rstrip(b"\xcc")
    offset = (len(end) + 15) & ~15
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    stubs = []
    for vector in range(32):
        va = text_va(KENTRY_GFN * PAGE + offset)
        stub = bytes(ks.asm(programs.UNEXPECTED_STUB.format(vector=vector, **addr), va)[0])
        page[offset:offset + len(stub)] = stub
        stubs.append(va)
        offset += 16
    assert offset <= PAGE
    return stubs


def _descriptor_tables(pages, stubs, addr, vcpus: int) -> None:
    gdt_page = pages.setdefault(GDT_GFN, bytearray(PAGE))
    for cpu in range(vcpus):
        base = cpu * PER_VCPU_GDT
        tss_va = text_va(GDT_GFN * PAGE + base + 0x100)
        gdt = build_gdt(tss_va)
        gdt_page[base:base + len(gdt)] = gdt
        rsp0 = text_va(RSP0_GFNS[cpu] * PAGE + PAGE)
        gdt_page[base + 0x100:base + 0x100 + 104] = build_tss(rsp0)
    idt = bytearray()
    for vector in range(256):
        target = stubs[vector] if vector < 32 else stubs[13]
        dpl = 0
        if vector == VEC_BP:
            target, dpl = addr["bp_handler"], 3  # int3 is allowed from user mode
        elif vector == VEC_DB:
            target = addr["db_handler"]
        idt += gate_descriptor(target, KERNEL_CS, dpl)
    pages[IDT_GFN] = idt


def _init_data(pages, symbols, switches: dict[str, int]) -> None:
    page = pages.setdefault(DATA_GFN, bytearray(PAGE))
    ktext = bytes(pages[KTEXT_GFN])
    values = {"sum_expected": checksum(ktext), "sum_start": text_va(KTEXT_GFN * PAGE),
              "sum_len": PAGE, "cfg_int3_mask": 0, "cfg_lstar_mask": 0}
    for name, value in switches.items():
        key = f"cfg_{name}"
        if key not in symbols:
            raise ValueError(f"unknown guest switch {name!r}")
        values[key] = value
    for name, value in values.items():
        struct.pack_into("<Q", page, symbols[name].pa - DATA_GFN * PAGE, value)


def _vcpu_init(cpu: int, symbols: dict[str, Symbol]) -> VcpuInit:
    gdt_va = text_va(GDT_GFN * PAGE + cpu * PER_VCPU_GDT)
    stack_top = text_va(KSTACK_GFNS[cpu][1] * PAGE + PAGE)
    return VcpuInit(
        rip=symbols["main0" if cpu == 0 else "main1"].va,
        rsp=stack_top,
        cr3=symbols["cr3_a"].pa,
        gdt=(gdt_va, 0x4F),
        idt=(text_va(IDT_GFN * PAGE), 256 * 16 - 1),
        tr=(TSS_SEL, gdt_va + 0x100, 103),
        gprs={"r15": cpu},
        msrs={MSR_STAR: STAR_VALUE, MSR_FMASK: FMASK_VALUE},
    )
