"""x86-64 architectural constants and table encoders used to build guest images.

Selectors follow Linux's GDT so that STAR-based SYSCALL/SYSRET land on the usual values
(kernel CS 0x10 / SS 0x18, user CS 0x33 / SS 0x2b).
"""

from __future__ import annotations

import struct

PAGE = 0x1000

# Page-table entry bits.
PTE_P = 1 << 0
PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_PS = 1 << 7
PTE_NX = 1 << 63
PTE_ADDR = 0x000F_FFFF_FFFF_F000

# Control registers and EFER.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31)
CR4_PAE, CR4_PGE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 7, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
CR0_LONG = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
CR4_LONG = CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT
EFER_LONG = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE

# RFLAGS.
RFLAGS_FIXED = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_AC = 1 << 18

# MSRs.
MSR_EFER = 0xC000_0080
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_FMASK = 0xC000_0084
MSR_FS_BASE = 0xC000_0100
MSR_GS_BASE = 0xC000_0101
MSR_KERNEL_GS_BASE = 0xC000_0102
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176

# GDT layout (index -> selector), as Linux lays it out.
KERNEL_CS = 0x10
KERNEL_DS = 0x18
USER32_CS = 0x23
USER_DS = 0x2B
USER_CS = 0x33
TSS_SEL = 0x40
STAR_VALUE = (USER32_CS << 48) | (KERNEL_CS << 32)
FMASK_VALUE = RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_NT | RFLAGS_AC

# Exception vectors the model and the images care about.
VEC_DE, VEC_DB, VEC_BP, VEC_UD, VEC_GP, VEC_PF = 0, 1, 3, 6, 13, 14
VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def segment_descriptor(access: int, flags: int, base: int = 0, limit: int = 0xFFFFF) -> bytes:
    """An 8-byte code/data descriptor: access byte (P, DPL, S, type) and flags nibble (G, D/B, L)."""
    value = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
    value |= ((limit >> 16) & 0xF) << 48 | (flags << 52) | ((base >> 24) & 0xFF) << 56
    return struct.pack("<Q", value)


def tss_descriptor(base: int, limit: int = 103) -> bytes:
    """A 16-byte 64-bit TSS descriptor (type 9: available)."""
    low = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40)
    low |= ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56
    return struct.pack("<QQ", low, base >> 32)


def gate_descriptor(offset: int, selector: int, dpl: int, gate_type: int = 0xE, ist: int = 0) -> bytes:
    """A 16-byte 64-bit IDT gate (0xE interrupt gate, 0xF trap gate, 0xC call gate)."""
    low = (offset & 0xFFFF) | (selector << 16) | (ist << 32)
    low |= (gate_type | (dpl << 5) | 0x80) << 40 | ((offset >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", low, offset >> 32)


def build_gdt(tss_base: int) -> bytes:
    """The guest GDT: null, kernel32 CS, kernel CS/DS, user32 CS, user DS/CS, a spare, the TSS."""
    entries = [
        bytes(8),
        segment_descriptor(0x9B, 0xC),  # 0x08 kernel 32-bit code (unused)
        segment_descriptor(0x9B, 0xA),  # 0x10 kernel 64-bit code
        segment_descriptor(0x93, 0xC),  # 0x18 kernel data
        segment_descriptor(0xFB, 0xC),  # 0x23 user 32-bit code
        segment_descriptor(0xF3, 0xC),  # 0x2b user data
        segment_descriptor(0xFB, 0xA),  # 0x33 user 64-bit code
        bytes(8),
        tss_descriptor(tss_base),       # 0x40 TSS (two slots)
    ]
    return b"".join(entries)


def build_tss(rsp0: int, ist1: int = 0) -> bytes:
    """A 104-byte 64-bit TSS with RSP0 (stack for entries from ring 3) and IST1."""
    tss = bytearray(104)
    struct.pack_into("<Q", tss, 4, rsp0)
    struct.pack_into("<Q", tss, 36, ist1)
    struct.pack_into("<H", tss, 102, 104)  # I/O map base past the limit: no I/O bitmap
    return bytes(tss)
