"""Planning a range step (`vCont;rSTART,END`): where can execution leave the range?

GDB's `next` asks the target to keep stepping while the PC stays in [START, END). Stepping one
instruction at a time costs a hypervisor round trip each; instead the range is decoded once and
execution runs at full speed with a temporary breakpoint on every way out:
- a direct jump, branch or call whose target lies outside the range: a breakpoint at the target;
- falling off the end: a breakpoint at END;
- anything whose destination decoding cannot tell (indirect jump or call, return, syscall, int,
  iret...): a breakpoint on the instruction itself, which is then single-stepped.
If the range cannot be decoded at all, the caller falls back to stepping every instruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import capstone
from capstone import x86_const

MAX_RANGE = 1 << 16  # larger ranges are stepped one instruction at a time


@dataclass(frozen=True, slots=True)
class RangePlan:
    start: int
    end: int
    exits: frozenset[int]  # addresses outside the range where execution may arrive
    step_points: frozenset[int] = field(default=frozenset())  # in-range instructions to single-step

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end


@lru_cache(maxsize=1)
def _decoder() -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    return cs


_LEAVES = {
    capstone.CS_GRP_RET,
    capstone.CS_GRP_IRET,
    capstone.CS_GRP_INT,
    x86_const.X86_GRP_PRIVILEGE,  # e.g. sysret, hlt? (privileged: let the step tell)
}
_BRANCHES = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_BRANCH_RELATIVE)
_SYSCALLS = {"syscall", "sysenter", "sysexit", "sysret", "sysretq", "ud2", "ud1", "ud0", "int3"}


def plan_range(code: bytes, start: int, end: int) -> RangePlan | None:
    """Decode `code` (the bytes of [start, end)) and find every way out; None if undecodable."""
    if not 0 < end - start <= MAX_RANGE or len(code) < end - start:
        return None
    exits: set[int] = set()
    steps: set[int] = set()
    address = start
    for insn in _decoder().disasm(code[: end - start], start):
        address = insn.address + insn.size
        if insn.mnemonic in _SYSCALLS or any(insn.group(g) for g in _LEAVES):
            steps.add(insn.address)
        elif any(insn.group(g) for g in _BRANCHES):
            target = _direct_target(insn)
            if target is None:
                steps.add(insn.address)
            elif not start <= target < end:
                exits.add(target)
    if address != end:
        return None  # bytes capstone could not decode, or an instruction straddling END
    exits.add(end)
    return RangePlan(start, end, frozenset(exits), frozenset(steps))


def _direct_target(insn: capstone.CsInsn) -> int | None:
    operands = insn.operands
    if len(operands) == 1 and operands[0].type == x86_const.X86_OP_IMM:
        return operands[0].imm & 0xFFFF_FFFF_FFFF_FFFF
    return None
