"""The debugger's small value types: process scope, range steps, memory faults, register views."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.range_step import RangePlan


class MemoryFault(Exception):
    """Not one byte at `address` could be read or written."""

    def __init__(self, address: int, why: str) -> None:
        super().__init__(f"cannot access memory at {address:#x}: {why}")
        self.address = address


class RegisterWriteRefused(Exception):
    """The value asked for is one no x86-64 vCPU can hold; the message says why."""


def cr3_base(cr3: int) -> int:
    """The page-table base in CR3, without PCID bits and the PTI user/kernel bit (bit 12)."""
    return cr3 & 0x000F_FFFF_FFFF_E000


@dataclass(frozen=True, slots=True)
class ProcessScope:
    """One guest process as the debugging scope (or an address space named by its page tables
    alone, `pid` None, for a guest vmigdb cannot analyse)."""

    pid: int | None
    comm: str
    cr3: int  # physical address of its page tables (what CR3 holds, without PCID/PTI bits)
    exit_hook: int | None = None  # kernel address of the exit path (e.g. do_exit)
    # Given the registers at the exit hook: is it this process (not just one of its threads)?
    is_exiting: Callable[[RegisterFile], bool] | None = None


@dataclass(frozen=True, slots=True)
class RangeStep:
    """GDB's vCont;rSTART,END: keep stepping while START <= rip < END."""

    start: int
    end: int


Action = str | RangeStep  # 'c', 's' or a range step


@dataclass(frozen=True, slots=True)
class ActiveRange:
    cpu: int
    start: int
    end: int
    plan: RangePlan | None  # None: no plan, every instruction is stepped
    cr3: int  # exit breakpoints count only in this address space

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end

    def owns(self, cpu: int, regs: RegisterFile) -> bool:
        return cpu == self.cpu and cr3_base(regs["cr3"]) == self.cr3


@dataclass(frozen=True, slots=True)
class RegisterView:
    """What GDB sees of one vCPU's registers at a catchpoint stop, when that is not the vCPU's
    own state: at a system call's entry the vCPU is in the kernel, and GDB is shown the caller's
    registers as the kernel saved them (what ptrace shows at a syscall-entry stop).

    :ivar registers: The registers GDB reads (``g``, ``p``).
    :ivar orig_rax: GDB's ``orig_rax``: the system call's number.
    :ivar slots: Register number -> kernel address of the 8 bytes holding the caller's value: a
        write from GDB goes there (the system call sees it, as with ptrace).
    :ivar fixed: Register numbers GDB may not write in this view (with the reason).
    """

    registers: RegisterFile
    orig_rax: int
    slots: dict[int, int] = field(default_factory=dict)
    fixed: dict[int, str] = field(default_factory=dict)
    orig_rax_slot: int | None = None
