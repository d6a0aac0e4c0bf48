"""The process scope (`monitor process`): one process's address space, and the watch on its exit.

While a process is in scope, GDB's virtual addresses go through its page tables (`MachineState`)
and new breakpoints fire only in it (`Debugger.add_breakpoint`). Its exit is watched with a
breakpoint of vmigdb's own on the kernel's exit path, which counts only in the process's address
space (`RunControl` asks `exiting` at each hit); a machine that never runs (a dump) needs no such
watch. This object is the only owner of the scope.
"""

from __future__ import annotations

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.breakpoints import BreakpointTable
from vmigdb.debugger.model import ProcessScope, cr3_base

OWNER = "scope"  # the owner name of the exit hook among vmigdb's own breakpoints


class ScopeWatch:
    def __init__(self, breakpoints: BreakpointTable, *, watch_exit: bool = True) -> None:
        self._breakpoints = breakpoints
        self._watch_exit = watch_exit  # False without run control: nothing exits in a dump
        self.current: ProcessScope | None = None

    def set(self, scope: ProcessScope | None) -> None:
        """Debug `scope`'s address space (None: the whole machine again)."""
        self._breakpoints.release_internal(OWNER)
        self.current = scope
        if scope is not None and scope.exit_hook is not None and self._watch_exit:
            self._breakpoints.add_internal(scope.exit_hook, OWNER)

    @property
    def cr3(self) -> int | None:
        """The scoped process's page-table base, or None for the whole machine."""
        return self.current.cr3 if self.current is not None else None

    def exiting(self, rip: int, regs: RegisterFile) -> bool:
        """Is a vCPU stopped at `rip` with `regs` the scoped process on its way out?"""
        scope = self.current
        return (
            scope is not None
            and rip == scope.exit_hook
            and cr3_base(regs["cr3"]) == cr3_base(scope.cr3)
            and (scope.is_exiting is None or scope.is_exiting(regs))
        )
