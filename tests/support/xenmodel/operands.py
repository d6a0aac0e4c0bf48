"""The exact linear address of a faulting access, which Unicorn's TLB fill does not give.

Unicorn calls the TLB-fill hook with the page address only, while an EPT violation reports the
linear address and page offset of the access (VMCS guest-linear address, exit qualification).
So when a data access faults, the model decodes the instruction (capstone) and computes the
effective address of the memory operand that touches the faulting page, including the implicit
stack accesses of push/call/pop/ret. A fetch fault is at RIP, or at the start of the page an
instruction crosses into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capstone import CS_AC_READ, CS_AC_WRITE, CS_ARCH_X86, CS_MODE_64, Cs
from capstone.x86 import X86_OP_MEM

from tests.support.xenmodel.guest.x86 import PAGE
from tests.support.xenmodel.paging import Access

if TYPE_CHECKING:
    from tests.support.xenmodel.vcpu import VCpu

_disasm = Cs(CS_ARCH_X86, CS_MODE_64)
_disasm.detail = True
PUSHES = frozenset({"push", "call", "pushfq", "enter"})
POPS = frozenset({"pop", "ret", "popfq", "leave", "iretq"})
MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def fault_address(vcpu: VCpu, page: int, access: Access) -> int:
    """The linear address of the access to `page` (page-aligned) that faulted at vcpu's RIP."""
    rip = vcpu.reg("rip")
    if access is Access.FETCH:
        return rip if rip & ~(PAGE - 1) == page else page
    try:
        insn = next(_disasm.disasm(vcpu.read_virt(rip, 15), rip))
    except StopIteration:
        return page
    wanted = CS_AC_WRITE if access is Access.WRITE else CS_AC_READ
    candidates = []
    for op in insn.operands:
        if op.type == X86_OP_MEM and op.access & wanted:
            candidates.append((_effective(vcpu, insn, op), op.size))
    if not candidates and insn.mnemonic in PUSHES and access is Access.WRITE:
        candidates.append(((vcpu.reg("rsp") - 8) & MASK64, 8))
    if not candidates and insn.mnemonic in POPS and access is Access.READ:
        candidates.append((vcpu.reg("rsp"), 8))
    for address, size in candidates:
        if address & ~(PAGE - 1) == page:
            return address
        if (address + size - 1) & ~(PAGE - 1) == page:
            return page  # the access crosses into the faulting page
    return page


def _effective(vcpu: VCpu, insn, op) -> int:
    mem = op.mem
    address = mem.disp
    if mem.base:
        name = insn.reg_name(mem.base)
        address += insn.address + insn.size if name == "rip" else _gpr(vcpu, name)
    if mem.index:
        address += _gpr(vcpu, insn.reg_name(mem.index)) * mem.scale
    if mem.segment:
        segment = insn.reg_name(mem.segment)
        if segment in ("fs", "gs"):
            address += vcpu.reg(f"{segment}_base")
    return address & MASK64


def _gpr(vcpu: VCpu, name: str) -> int:
    if name.startswith("e") and len(name) == 3:  # 32-bit addressing (0x67 prefix)
        return vcpu.reg("r" + name[1:]) & 0xFFFF_FFFF
    if name.endswith("d") and name.startswith("r"):
        return vcpu.reg(name[:-1]) & 0xFFFF_FFFF
    return vcpu.reg(name)
