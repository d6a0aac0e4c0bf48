"""Stop events in debugger terms: why the machine stopped, which vCPU, and what GDB should be told."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.hv.base import BreakpointType

SIGINT = 2
SIGTRAP = 5


class StopReason(enum.Enum):
    STEP = "step"  # a single-step finished
    SW_BREAK = "swbreak"  # a GDB software breakpoint (rip is at its address)
    HW_BREAK = "hwbreak"  # a GDB hardware breakpoint
    WATCH = "watch"  # a watchpoint, after the access
    INTERRUPT = "interrupt"  # ^C, or a halt at attach
    CATCH = "catch"  # a catchpoint: a guest event (system call, exec, module, panic, the driver's own)
    SIGNAL = "signal"  # any other stop the hypervisor reported
    EXITED = "exited"  # the VM is gone


@dataclass(frozen=True, slots=True)
class SyscallStop:
    """A system-call stop as GDB's stop reply names it (``syscall_entry:NR`` or
    ``syscall_return:NR``)."""

    phase: str  # "entry" or "return"
    number: int


@dataclass(frozen=True, slots=True)
class StopEvent:
    reason: StopReason
    cpu: int | None
    signal: int = SIGTRAP
    watch: tuple[BreakpointType, int] | None = None
    exit_code: int | None = None
    registers: RegisterFile | None = None  # the stopping vCPU's registers, to expedite
    message: str | None = None  # shown on GDB's console before the stop (an `O` packet)
    syscall: SyscallStop | None = None  # a system-call catchpoint's stop
    # GDB should read the library list again (the scope changed, a module loaded): the session
    # first reports a library stop, then this one when GDB resumes after reading it.
    libraries_changed: bool = False
    libraries_only: bool = False  # the library change is all there is: GDB reads and resumes
