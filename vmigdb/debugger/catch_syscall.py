"""`catch syscall`: GDB's system-call catchpoints (``QCatchSyscalls``), served from outside the guest.

Entry: a hook on the kernel's handler of each system call caught (`GuestOS.syscall_hooks`; one on
the kernel's dispatcher when GDB catches them all), filtered by the scoped process's page tables
when a process is in scope. Only the system calls caught cost a VM stop; every other one runs at
full speed. At the hook the vCPU is in the kernel, so GDB is shown a `RegisterView`: the caller's
registers as the kernel saved them (``rip`` after the ``syscall`` instruction, arguments in
``rdi rsi rdx r10 r8 r9``, ``rax`` = -ENOSYS, ``orig_rax`` = the number), as ptrace shows them at
a syscall-entry stop. A register GDB writes there is written where the kernel saved it: the
system call sees the new value.

Return: the entry places a hook of its own in the caller's code, at the instruction after the
``syscall`` instruction, for that process (page tables) and that thread (stack pointer) only.
The system call returns there in user mode with its result in ``rax``: that stop is the vCPU's
real state, and ``stepi`` goes on from it. System calls that never return there (exit,
exit_group, rt_sigreturn) place none. An execve that succeeds never returns to the old program
either; its hook is dropped when the catchpoints change.
"""

from __future__ import annotations

import logging

from vmigdb.arch.x86_64.registers import REGISTER_INDEX, REGISTERS, RegisterFile
from vmigdb.debugger.breakpoints import BreakpointLimitError
from vmigdb.debugger.catchpoints import (
    Catchpoint,
    CatchStop,
    Hit,
    HitFilter,
)
from vmigdb.debugger.events import SyscallStop
from vmigdb.debugger.guest_view import ANALYSIS_ERRORS, GuestUnavailable, GuestView
from vmigdb.debugger.model import ProcessScope, RegisterView, cr3_base
from vmigdb.guest.base import SyscallFrame
from vmigdb.hv.base import DriverError

log = logging.getLogger("vmigdb.debugger")

ENTRY, RETURN = "entry", "return"
_FIXED = {
    "cs": "the caller's code segment is fixed at a system-call stop",
    "ss": "the caller's stack segment is fixed at a system-call stop",
    "gs_base": "GS bases cannot be written at a system-call stop (the kernel's are live)",
    "k_gs_base": "GS bases cannot be written at a system-call stop (the kernel's are live)",
}


class SyscallCatchError(Exception):
    """The system calls GDB asked for cannot be caught; the message says why."""


def syscall_view(hardware: RegisterFile, frame: SyscallFrame) -> RegisterView:
    """GDB's view of the caller at a system call's entry: the saved registers over the vCPU's
    own (FPU, vector and segment-base state is still the caller's; the kernel runs on GS_BASE
    after ``swapgs``, so the caller's GS base is in KERNEL_GS_BASE and is shown as gs_base)."""
    regs = hardware
    slots: dict[int, int] = {}
    for name, value in frame.registers.items():
        if name == "orig_rax":
            continue
        regnum = REGISTER_INDEX[name]
        size = REGISTERS[regnum].bitsize // 8
        regs = regs.with_value(regnum, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        if name not in _FIXED:
            slots[regnum] = frame.slots[name]
    gs, kgs = REGISTER_INDEX["gs_base"], REGISTER_INDEX["k_gs_base"]
    regs = regs.with_value(gs, hardware.raw(kgs)).with_value(kgs, hardware.raw(gs))
    fixed = {REGISTER_INDEX[name]: why for name, why in _FIXED.items()}
    return RegisterView(regs, frame.number, slots, fixed, frame.slots.get("orig_rax"))


class SyscallCatch(Catchpoint):
    kind = "syscall"

    def __init__(self, guest: GuestView) -> None:
        super().__init__()
        self._guest = guest
        self.enabled = False
        self.numbers: frozenset[int] | None = None  # None: every system call
        self._aimed_at: int | None = None  # the scope cr3 the entry hooks filter on
        self._scope: ProcessScope | None = None
        self._pending: dict[tuple[int, int], int] = {}  # (cr3 base, caller rsp) -> number

    @property
    def armed(self) -> bool:
        return self.enabled

    def status(self) -> str:
        if not self.enabled:
            return "off (GDB's catch syscall turns it on)"
        which = (
            "every system call"
            if self.numbers is None
            else ("system calls " + ", ".join(str(n) for n in sorted(self.numbers)))
        )
        where = f"in process {self._scope.pid}" if self._scope else "in every process"
        waiting = f"; {len(self._pending)} awaiting their return" if self._pending else ""
        return f"on: {which}, {where}{waiting}"

    # -- GDB's QCatchSyscalls ---------------------------------------------------------------------

    def configure(
        self, enabled: bool, numbers: frozenset[int] | None, scope: ProcessScope | None
    ) -> None:
        """What GDB catches now. Hooks are placed at once, so a failure reaches GDB's request.

        :raises SyscallCatchError: if the guest cannot be analysed or has no such system call
        """
        if not enabled:
            # GDB turns its catchpoints off at every stop and on again before it resumes: the
            # entry hooks go (lazily: the hypervisor keeps them if they come back at once), the
            # returns awaited stay, and one that comes while GDB catches nothing is dropped.
            assert self.hooks is not None
            self.hooks.remove(lambda hook: hook.tag == ENTRY)
            self.enabled = False
            self._aimed_at = None
            return
        if enabled == self.enabled and numbers == self.numbers and self._same_scope(scope):
            return
        self._aim(numbers, scope)
        self.enabled = True
        self.numbers = numbers

    def _same_scope(self, scope: ProcessScope | None) -> bool:
        return (scope.cr3 if scope else None) == self._aimed_at

    def _aim(self, numbers: frozenset[int] | None, scope: ProcessScope | None) -> None:
        assert self.hooks is not None
        try:
            addresses = self._guest.os().syscall_hooks(numbers)
        except GuestUnavailable as exc:
            raise SyscallCatchError(f"vmigdb: cannot catch system calls: {exc}") from None
        except ANALYSIS_ERRORS as exc:
            raise SyscallCatchError(f"vmigdb: cannot catch these system calls: {exc}") from None
        self.hooks.remove(lambda hook: hook.tag == ENTRY)
        cr3 = scope.cr3 if scope else None
        try:
            for address in addresses:
                self.hooks.add(address, HitFilter(cr3=cr3), ENTRY)
        except (BreakpointLimitError, DriverError) as exc:
            self.hooks.remove(lambda hook: hook.tag == ENTRY)
            raise SyscallCatchError(f"vmigdb: cannot place the system-call hooks: {exc}") from None
        self._aimed_at = cr3
        self._scope = scope

    def resuming(self, scope: ProcessScope | None) -> None:
        if self.enabled and not self._same_scope(scope):
            try:
                self._aim(self.numbers, scope)
            except SyscallCatchError as exc:
                log.warning("%s", exc)

    def clear(self) -> None:
        super().clear()
        self.enabled = False
        self.numbers = None
        self._aimed_at = None
        self._scope = None
        self._pending.clear()

    # -- hits -------------------------------------------------------------------------------------

    def hit(self, hit: Hit) -> CatchStop | None:
        if hit.hook.tag == ENTRY:
            return self._entry(hit)
        return self._return(hit)

    def _entry(self, hit: Hit) -> CatchStop | None:
        guest_os = self._guest.os()
        try:
            frame = guest_os.syscall_frame(hit.regs)
        except ANALYSIS_ERRORS as exc:
            log.info("system call at %#x not readable: %s", hit.regs["rip"], exc)
            return None
        if frame is None or (self.numbers is not None and frame.number not in self.numbers):
            return None
        if frame.returns:
            self._expect_return(hit.regs, frame)
        return CatchStop(
            message=self._who(hit.regs),
            syscall=SyscallStop(ENTRY, frame.number),
            view=syscall_view(hit.regs, frame),
        )

    def _expect_return(self, regs: RegisterFile, frame: SyscallFrame) -> None:
        assert self.hooks is not None
        key = (cr3_base(regs["cr3"]), frame.registers["rsp"])
        if key not in self._pending:  # a restarted system call enters again: one return
            try:
                self.hooks.add(frame.registers["rip"], HitFilter(cr3=key[0], rsp=key[1]), RETURN)
            except (BreakpointLimitError, DriverError) as exc:
                log.warning("system call %d: its return will not be caught (%s)", frame.number, exc)
                return
        self._pending[key] = frame.number

    def _return(self, hit: Hit) -> CatchStop | None:
        assert self.hooks is not None
        key = (cr3_base(hit.regs["cr3"]), hit.regs["rsp"])
        number = self._pending.pop(key, None)
        self.hooks.remove(lambda hook: hook is hit.hook)
        if number is None or not self.enabled:
            return None
        return CatchStop(
            message=self._who(hit.regs),
            syscall=SyscallStop(RETURN, number),
            orig_rax=number,
        )

    def _who(self, regs: RegisterFile) -> str | None:
        """Unscoped, which process made the system call (one console line)."""
        if self._scope is not None:
            return None
        try:
            process = self._guest.os().current_process(regs)
        except ANALYSIS_ERRORS:
            return None
        if process is None:
            return None
        return f"vmigdb: system call by process {process.pid} ({process.comm})"
