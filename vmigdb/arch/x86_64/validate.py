"""Register writes no x86-64 CPU could hold: refused before they reach the hypervisor.

QEMU's gdbstub stores what it is given (target/i386/gdbstub.c: `env->eflags = ldl_p(buf)`), so an
RFLAGS with reserved bits set, a non-canonical RIP or segment base, or a null code segment would be
loaded into the vCPU as is, and the guest would fault or triple-fault on its next instruction. A
debugger must not be the way a typo kills the machine: such a write is refused with the reason.

Values the architecture allows are never refused, however unusual (clearing IF, changing CR3).
"""

from __future__ import annotations

from vmigdb.arch.x86_64.registers import REGISTERS, RegisterFile

# RFLAGS: bit 1 reads as 1; bits 3, 5, 15 and 22-63 are reserved and read as 0 (SDM vol. 1, 3.4.3).
_RFLAGS_FIXED_ONE = 1 << 1
_RFLAGS_RESERVED = (1 << 3) | (1 << 5) | (1 << 15) | ~((1 << 22) - 1)
_RFLAGS_VM = 1 << 17
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_CANONICAL = ("rip", "fs_base", "gs_base", "k_gs_base")
# CR0 bits 32-63 are reserved; CR4's defined bits stop at bit 24 (PKS); EFER defines SCE, LME,
# LMA, NXE, SVME, LMSLE, FFXSR, TCE and AUTOIBRS (bits 0, 8, 10-15, 21).
_CR0_RESERVED = ~((1 << 32) - 1)
_CR0_PE, _CR0_NW, _CR0_CD, _CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
_CR4_RESERVED = ~((1 << 25) - 1)
_EFER_DEFINED = (1 << 0) | (1 << 8) | (0x3F << 10) | (1 << 21)
_EFER_LMA = 1 << 10


def _canonical(value: int, bits: int = 48) -> bool:
    top = value >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def check_register_write(regnum: int, value: bytes, current: RegisterFile) -> str | None:
    """Why writing `value` (little-endian) to canonical register `regnum` is impossible, or None."""
    name = REGISTERS[regnum].name
    v = int.from_bytes(value, "little")
    la57 = bool(current["cr4"] & (1 << 12))
    long_mode = bool(current["efer"] & _EFER_LMA)
    if name == "eflags":
        if v & _RFLAGS_RESERVED & 0xFFFF_FFFF:
            return f"eflags {v:#x} sets reserved bits ({v & _RFLAGS_RESERVED & 0xFFFF_FFFF:#x})"
        if not v & _RFLAGS_FIXED_ONE:
            return f"eflags {v:#x} clears bit 1, which always reads as 1"
        if v & _RFLAGS_VM and long_mode:
            return f"eflags {v:#x} sets VM (virtual-8086 mode), which long mode does not have"
    elif name in _SEGMENTS:
        if v > 0xFFFF:
            return f"{name} selector {v:#x} does not fit in 16 bits"
        if name in ("cs", "ss") and current["cr0"] & _CR0_PE:
            if name == "cs" and v & ~3 == 0:
                return "cs cannot be the null selector"
            if name == "ss" and v & ~3 == 0 and current["cs"] & 3 != 0:
                return "ss cannot be the null selector outside ring 0"
            other = current["ss"] if name == "cs" else current["cs"]
            if v & 3 != other & 3:
                return (
                    f"{name} selector {v:#x} has RPL {v & 3} but "
                    f"{'ss' if name == 'cs' else 'cs'} has {other & 3}: CS and SS carry the CPL"
                )
    elif name in _CANONICAL:
        if long_mode and not _canonical(v, 57 if la57 else 48):
            return f"{name} {v:#x} is not a canonical address"
    elif name == "cr0":
        if v & _CR0_RESERVED:
            return f"cr0 {v:#x} sets reserved bits 32-63"
        if v & _CR0_PG and not v & _CR0_PE:
            return "cr0 with PG set needs PE set"
        if v & _CR0_NW and not v & _CR0_CD:
            return "cr0 with NW set needs CD set"
    elif name == "cr4":
        if v & _CR4_RESERVED:
            return f"cr4 {v:#x} sets reserved bits ({v & _CR4_RESERVED:#x})"
    elif name == "efer":
        if v & ~_EFER_DEFINED:
            return f"efer {v:#x} sets reserved bits ({v & ~_EFER_DEFINED:#x})"
    elif name == "cr3":
        if (v & ((1 << 63) - 1)) >> 52:
            return f"cr3 {v:#x} sets reserved bits 52-62"
    elif name == "cr8":
        if v > 0xF:
            return f"cr8 {v:#x} does not fit in 4 bits"
    return None
