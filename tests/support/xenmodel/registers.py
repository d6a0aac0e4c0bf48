"""vCPU register access by name, on the loaded Unicorn context.

Names follow libvmi's x86_registers_t / reg_t vocabulary (rax, cr3, fs_base, msr_lstar, ...).
Segment selectors written through Unicorn in 64-bit mode change only the visible selector, not
the hidden descriptor or the privilege level (see machine.py); the model keeps them consistent.
"""

from __future__ import annotations

from unicorn import Uc
from unicorn import x86_const as x

from tests.support.xenmodel.guest.x86 import (
    MSR_CSTAR,
    MSR_EFER,
    MSR_FMASK,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_STAR,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP,
)

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # hardware numbering

PLAIN: dict[str, int] = {
    **{name: getattr(x, f"UC_X86_REG_{name.upper()}") for name in GPRS},
    "rip": x.UC_X86_REG_RIP, "rflags": x.UC_X86_REG_RFLAGS,
    "cr0": x.UC_X86_REG_CR0, "cr2": x.UC_X86_REG_CR2, "cr3": x.UC_X86_REG_CR3,
    "cr4": x.UC_X86_REG_CR4, "cr8": x.UC_X86_REG_CR8,
    "dr0": x.UC_X86_REG_DR0, "dr1": x.UC_X86_REG_DR1, "dr2": x.UC_X86_REG_DR2,
    "dr3": x.UC_X86_REG_DR3, "dr6": x.UC_X86_REG_DR6, "dr7": x.UC_X86_REG_DR7,
    "cs_sel": x.UC_X86_REG_CS, "ds_sel": x.UC_X86_REG_DS, "es_sel": x.UC_X86_REG_ES,
    "fs_sel": x.UC_X86_REG_FS, "gs_sel": x.UC_X86_REG_GS, "ss_sel": x.UC_X86_REG_SS,
    "fs_base": x.UC_X86_REG_FS_BASE, "gs_base": x.UC_X86_REG_GS_BASE,
}
MSRS: dict[str, int] = {
    "msr_efer": MSR_EFER, "msr_star": MSR_STAR, "msr_lstar": MSR_LSTAR, "msr_cstar": MSR_CSTAR,
    "msr_syscall_mask": MSR_FMASK, "shadow_gs": MSR_KERNEL_GS_BASE,
    "sysenter_cs": MSR_SYSENTER_CS, "sysenter_esp": MSR_SYSENTER_ESP,
    "sysenter_eip": MSR_SYSENTER_EIP,
}
TABLES = {"gdtr": x.UC_X86_REG_GDTR, "idtr": x.UC_X86_REG_IDTR, "tr": x.UC_X86_REG_TR,
          "ldtr": x.UC_X86_REG_LDTR}

# What Xen's vm_event request carries (vm_event_regs_x86) and libvmi copies into x86_regs.
EVENT_REGS = GPRS + ("rflags", "dr6", "dr7", "rip", "cr0", "cr2", "cr3", "cr4", "sysenter_cs",
                     "sysenter_esp", "sysenter_eip", "msr_efer", "msr_star", "msr_lstar",
                     "fs_base", "gs_base", "shadow_gs")


def read(uc: Uc, name: str) -> int:
    """A register of the loaded vCPU; table registers as `gdtr_base`, `tr_limit`, `tr_sel`..."""
    if name in PLAIN:
        return uc.reg_read(PLAIN[name]) & 0xFFFF_FFFF_FFFF_FFFF
    if name in MSRS:
        return uc.msr_read(MSRS[name])
    table, _, part = name.rpartition("_")
    if table in TABLES:
        selector, base, limit, flags = uc.reg_read(TABLES[table])
        return {"base": base, "limit": limit, "sel": selector, "arbytes": flags}[part]
    raise KeyError(name)


def write(uc: Uc, name: str, value: int) -> None:
    if name in PLAIN:
        if name.endswith("_sel"):
            value &= 0xFFFF
        uc.reg_write(PLAIN[name], value)
        return
    if name in MSRS:
        uc.msr_write(MSRS[name], value)
        return
    table, _, part = name.rpartition("_")
    if table in TABLES and part in ("base", "limit"):
        selector, base, limit, flags = uc.reg_read(TABLES[table])
        base, limit = (value, limit) if part == "base" else (base, value)
        uc.reg_write(TABLES[table], (selector, base, limit, flags))
        return
    raise KeyError(name)


def snapshot(uc: Uc) -> dict[str, int]:
    """The registers a vm_event request carries, read now."""
    return {name: read(uc, name) for name in EVENT_REGS}
