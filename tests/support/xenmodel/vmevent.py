"""vm_event requests and responses between the model of Xen and the model of libvmi.

Names and flag values follow xen/include/public/vm_event.h (interface version 7). A request is
what a vCPU exit puts on the monitor ring (the vCPU stays paused until the response); a
response carries the flags libvmi's process_response sets from the callback's return value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from tests.support.xenmodel.exits import Exit


class Reason(IntEnum):
    MEM_ACCESS = 1
    WRITE_CTRLREG = 4
    MOV_TO_MSR = 5
    SOFTWARE_BREAKPOINT = 6
    SINGLESTEP = 7
    DEBUG_EXCEPTION = 10


# VM_EVENT_FLAG_*
FLAG_VCPU_PAUSED = 1 << 0
FLAG_FOREIGN = 1 << 1
FLAG_EMULATE = 1 << 2
FLAG_EMULATE_NOWRITE = 1 << 3
FLAG_TOGGLE_SINGLESTEP = 1 << 4
FLAG_SET_EMUL_READ_DATA = 1 << 5
FLAG_DENY = 1 << 6
FLAG_ALTERNATE_P2M = 1 << 7
FLAG_SET_REGISTERS = 1 << 8
FLAG_SET_EMUL_INSN_DATA = 1 << 9
FLAG_GET_NEXT_INTERRUPT = 1 << 10
FLAG_FAST_SINGLESTEP = 1 << 11

# VM_EVENT_X86_CR0/CR3/CR4 (write_ctrlreg.index)
CTRLREG_INDEX = {0: 0, 3: 1, 4: 2}


@dataclass
class Request:
    reason: Reason
    vcpu_id: int
    exit: Exit
    gfn: int = 0                  # mem_access / software_breakpoint / singlestep / debug: gfn
    altp2m_idx: int = 0
    flags: int = FLAG_VCPU_PAUSED
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class Response:
    vcpu_id: int
    flags: int = FLAG_VCPU_PAUSED
    altp2m_idx: int = 0
    regs: dict[str, int] | None = None   # SET_REGISTERS: GPRs, RFLAGS, RIP
