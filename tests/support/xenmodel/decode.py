"""Recognises the few instructions the model must see before the CPU runs them.

Unicorn executes everything else; these need the hypervisor: INT3 (exception bitmap), INT n and
ICEBP (delivered through the guest IDT by the model), MOV to CRn and WRMSR (monitor events),
SYSCALL/SYSENTER (Unicorn only calls hooks for them), HLT.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
# Bytes that can start one of the instructions below: a quick filter for the per-instruction hook.
FIRST_BYTES = frozenset(LEGACY_PREFIXES | set(range(0x40, 0x50)) | {0xCC, 0xCD, 0xF1, 0xF4, 0x0F})


class Kind(Enum):
    INT3 = "int3"
    INT_N = "int n"
    ICEBP = "icebp"
    HLT = "hlt"
    MOV_TO_CR = "mov to cr"
    WRMSR = "wrmsr"
    SYSCALL = "syscall"
    SYSENTER = "sysenter"


@dataclass(frozen=True)
class Insn:
    kind: Kind
    length: int
    cr: int = 0       # MOV_TO_CR: control register number
    gpr: int = 0      # MOV_TO_CR: source register (0 rax .. 15 r15, hardware numbering)
    vector: int = 0   # INT_N


def classify(code: bytes) -> Insn | None:
    """The instruction at the start of `code` (its exact bytes), if it is one the model handles."""
    i = 0
    while i < len(code) and code[i] in LEGACY_PREFIXES:
        i += 1
    rex = 0
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex = code[i]
        i += 1
    if i >= len(code):
        return None
    op = code[i]
    length = len(code)
    if op == 0xCC:
        return Insn(Kind.INT3, length)
    if op == 0xCD and i + 1 < len(code):
        return Insn(Kind.INT_N, length, vector=code[i + 1])
    if op == 0xF1:
        return Insn(Kind.ICEBP, length)
    if op == 0xF4:
        return Insn(Kind.HLT, length)
    if op != 0x0F or i + 1 >= len(code):
        return None
    op2 = code[i + 1]
    if op2 == 0x30:
        return Insn(Kind.WRMSR, length)
    if op2 == 0x05:
        return Insn(Kind.SYSCALL, length)
    if op2 == 0x34:
        return Insn(Kind.SYSENTER, length)
    if op2 == 0x22 and i + 2 < len(code):
        modrm = code[i + 2]
        cr = ((modrm >> 3) & 7) | ((rex & 4) << 1)
        gpr = (modrm & 7) | ((rex & 1) << 3)
        return Insn(Kind.MOV_TO_CR, length, cr=cr, gpr=gpr)
    return None
