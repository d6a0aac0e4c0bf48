"""vCPU registers through libvmi, in GDB's layout.

`get_vcpuregs` fills the cdef's `registers_t.x86` (GPRs, RIP, RFLAGS, CRs, FS/GS base, EFER); the
segment selectors and KERNEL_GS_BASE are not in it nor in the wheel's `X86Reg`, so they are read
one by one with libvmi.h's raw `reg_t` ids. libvmi has no FPU/SSE registers: GDB sees zeros there.
Writes go one register at a time through `set_vcpureg` (a `set_vcpuregs` from a fresh
`Registers()` would write zeros everywhere else; Xen refuses or worse).
"""

from __future__ import annotations

from typing import Any

from vmigdb.arch.x86_64.registers import REGISTERS, RegisterFile
from vmigdb.hv.base import DriverError

# libvmi.h reg_t ids the wheel's cdef does not name (see the libvmi notes).
CS_SEL, DS_SEL, ES_SEL, FS_SEL, GS_SEL, SS_SEL = 29, 30, 31, 32, 33, 34
FS_BASE, GS_BASE, SHADOW_GS = 50, 51, 68

_FROM_X86 = {
    **{name: name for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")},
    **{f"r{i}": f"r{i}" for i in range(8, 16)},
    "rip": "rip",
    "eflags": "rflags",
    "cr0": "cr0",
    "cr2": "cr2",
    "cr3": "cr3",
    "cr4": "cr4",
    "fs_base": "fs_base",
    "gs_base": "gs_base",
    "efer": "msr_efer",
}
_SELECTORS = {"cs": CS_SEL, "ss": SS_SEL, "ds": DS_SEL, "es": ES_SEL, "fs": FS_SEL, "gs": GS_SEL}


def read_registers(vmi: Any, libvmi: Any, vcpu: int) -> RegisterFile:
    """vCPU `vcpu` (0-based) of a paused domain."""
    try:
        owner = vmi.get_vcpuregs(vcpu)  # keep it: `x86` points into its memory
        x86 = owner.cffi_regs.x86
        values = {name: int(getattr(x86, field)) for name, field in _FROM_X86.items()}
        for name, reg in _SELECTORS.items():
            values[name] = vmi.get_vcpureg(reg, vcpu)
        values["k_gs_base"] = vmi.get_vcpureg(SHADOW_GS, vcpu)
    except libvmi.LibvmiError as exc:
        raise DriverError(f"libvmi could not read the registers of vCPU {vcpu}: {exc}") from None
    return RegisterFile.from_values(values)


def _write_ids(libvmi: Any) -> dict[str, int]:
    ids = {
        name: getattr(libvmi.X86Reg, field.upper()).value
        for name, field in _FROM_X86.items()
        if hasattr(libvmi.X86Reg, field.upper())
    }
    ids |= {
        "fs_base": FS_BASE,
        "gs_base": GS_BASE,
        "k_gs_base": SHADOW_GS,
        "efer": libvmi.MSR.EFER.value,
    }
    return ids


def write_register(vmi: Any, libvmi: Any, vcpu: int, regnum: int, value: bytes) -> None:
    name = REGISTERS[regnum].name
    reg = _write_ids(libvmi).get(name)
    if reg is None:
        raise DriverError(f"libvmi cannot write {name} (only general, control and base registers)")
    try:
        vmi.set_vcpureg(int.from_bytes(value, "little"), reg, vcpu)
    except libvmi.LibvmiError as exc:
        raise DriverError(f"libvmi could not write {name} of vCPU {vcpu}: {exc}") from None
