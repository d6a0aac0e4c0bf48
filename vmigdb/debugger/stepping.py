"""Which instructions may legitimately leave RIP where it was after one single-step.

QEMU 7.2's gdbstub now and then reports a single-step that did not move the vCPU, right after a
breakpoint change (measured here: about 1 in 100). vmigdb steps again in that case, but only when the
instruction could not have stayed put by itself: a `rep` string instruction does one iteration per
step, a jump or loop to itself and `hlt`/`mwait` stay, and so does anything we cannot decode.
"""

from __future__ import annotations

from functools import lru_cache

import capstone
from capstone import x86_const


@lru_cache(maxsize=1)
def _decoder() -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    return cs


_WAITS = {"hlt", "mwait", "mwaitx", "umwait", "tpause"}
_REP_PREFIXES = {x86_const.X86_PREFIX_REP, x86_const.X86_PREFIX_REPE, x86_const.X86_PREFIX_REPNE}


def may_stay_put(code: bytes, rip: int) -> bool:
    """True if one step of the instruction at `rip` (bytes `code`) may leave RIP unchanged."""
    insn = next(_decoder().disasm(code, rip, 1), None)
    if insn is None:
        return True
    if insn.mnemonic in _WAITS:
        return True
    if any(p in _REP_PREFIXES for p in insn.prefix):
        return True
    branch = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_BRANCH_RELATIVE)
    if any(insn.group(g) for g in branch):  # loop/loope/loopne are only "branch_relative"
        for op in insn.operands:
            # capstone gives a signed immediate; a kernel address is negative that way
            if op.type == x86_const.X86_OP_IMM and op.imm & 0xFFFF_FFFF_FFFF_FFFF == rip:
                return True
            if op.type != x86_const.X86_OP_IMM:
                return True  # an indirect target may be itself; do not second-guess it
    return False
