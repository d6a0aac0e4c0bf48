"""Event delivery through the guest's IDT, and SYSCALL, done by the model (Unicorn does neither).

Long-mode rules (Intel SDM vol. 3A, 6.14 "Exception and interrupt handling in 64-bit mode"): the
gate's target code segment sets the new privilege level; a move to ring 0 takes RSP0 (or the
gate's IST slot) from the TSS and loads a NULL SS; the stack is aligned to 16 and receives SS,
RSP, RFLAGS, CS, RIP and the error code; an interrupt gate clears IF; TF, NT and RF are cleared.
A software interrupt (INT3, INT n) checks the gate's DPL against the current privilege level.
The frame is written through the guest's page tables and the vCPU's view mapping, without
checking EPT permissions (not modelled: event delivery causing EPT violations, double faults).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from tests.support.xenmodel.errors import DomainCrash
from tests.support.xenmodel.guest.x86 import (
    EFER_SCE,
    RFLAGS_IF,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    VEC_GP,
    VEC_PF,
    VEC_UD,
)

if TYPE_CHECKING:
    from tests.support.xenmodel.vcpu import VCpu

MAX_NESTING = 3


def deliver(vcpu: VCpu, vector: int, return_rip: int, *, error_code: int | None = None,
            software: bool = False, cr2: int | None = None, _depth: int = 0) -> None:
    """Deliver `vector` to the guest handler; `return_rip` is the RIP saved in the frame."""
    if _depth >= MAX_NESTING:
        raise DomainCrash(f"triple fault delivering vector {vector}")
    cpl = vcpu.cpl()
    idt_base, idt_limit = vcpu.reg("idtr_base"), vcpu.reg("idtr_limit")
    if vector * 16 + 15 > idt_limit:
        return deliver(vcpu, VEC_GP, return_rip, error_code=vector * 8 + 2, _depth=_depth + 1)
    low, high = struct.unpack("<QQ", vcpu.read_virt(idt_base + vector * 16, 16))
    gate_type, dpl, present = (low >> 40) & 0xF, (low >> 45) & 3, (low >> 47) & 1
    if not present or gate_type not in (0xE, 0xF) or (software and dpl < cpl):
        return deliver(vcpu, VEC_GP, return_rip, error_code=vector * 8 + 2, _depth=_depth + 1)
    offset = (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | (high & 0xFFFF_FFFF) << 32
    selector, ist = (low >> 16) & 0xFFFF, (low >> 32) & 7
    target_cpl = _segment_dpl(vcpu, selector)
    rsp, ss = vcpu.reg("rsp"), vcpu.reg("ss_sel")
    if ist:
        new_rsp = _tss_qword(vcpu, 36 + (ist - 1) * 8)
    elif target_cpl < cpl:
        new_rsp = _tss_qword(vcpu, 4)
    else:
        new_rsp = rsp
    new_rsp &= ~0xF
    frame = [ss, rsp, vcpu.reg("rflags"), vcpu.reg("cs_sel"), return_rip]
    if error_code is not None:
        frame.append(error_code)
    new_rsp -= 8 * len(frame)
    vcpu.write_virt(new_rsp, struct.pack(f"<{len(frame)}Q", *reversed(frame)))
    rflags = vcpu.reg("rflags") & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)
    if gate_type == 0xE:
        rflags &= ~RFLAGS_IF
    if target_cpl < cpl:
        vcpu.machine.enter_ring0()
        vcpu.set_reg("ss_sel", 0)
    if cr2 is not None and vector == VEC_PF:
        vcpu.set_reg("cr2", cr2)
    vcpu.set_reg("rsp", new_rsp)
    vcpu.set_reg("cs_sel", selector)
    vcpu.set_reg("rflags", rflags)
    vcpu.set_reg("rip", offset)
    return None


def syscall(vcpu: VCpu, next_rip: int) -> None:
    """SYSCALL (Intel SDM vol. 2B): RCX/R11 saved, RFLAGS masked, ring 0 at LSTAR, same stack."""
    if not vcpu.reg("msr_efer") & EFER_SCE:
        deliver(vcpu, VEC_UD, next_rip - 2)
        return
    star, rflags, rsp = vcpu.reg("msr_star"), vcpu.reg("rflags"), vcpu.reg("rsp")
    vcpu.set_reg("rcx", next_rip)
    vcpu.set_reg("r11", rflags & ~RFLAGS_RF)
    if vcpu.cpl() != 0:
        vcpu.machine.enter_ring0()
        vcpu.set_reg("rsp", rsp)
    kernel_cs = (star >> 32) & 0xFFFC
    vcpu.set_reg("cs_sel", kernel_cs)
    vcpu.set_reg("ss_sel", kernel_cs + 8)
    vcpu.set_reg("rflags", rflags & ~vcpu.reg("msr_syscall_mask") & ~RFLAGS_RF)
    vcpu.set_reg("rip", vcpu.reg("msr_lstar"))


def _segment_dpl(vcpu: VCpu, selector: int) -> int:
    descriptor = struct.unpack("<Q", vcpu.read_virt(vcpu.reg("gdtr_base") + (selector & ~7), 8))[0]
    return (descriptor >> 45) & 3


def _tss_qword(vcpu: VCpu, offset: int) -> int:
    return struct.unpack("<Q", vcpu.read_virt(vcpu.reg("tr_base") + offset, 8))[0]
