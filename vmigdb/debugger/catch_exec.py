"""`monitor catch exec NAME`: stop the next process that executes a program named NAME, before its
first instruction, with the process scope set to it.

A hook on the kernel's exec path (`GuestOS.exec_hook`: the new program is mapped, the task's name
and page tables are the new ones, it has not returned to user mode yet) sees every exec. The first
whose program matches places a second hook at the address it will start at (the dynamic loader's
entry, or the program's own for a static one), for its page tables only, and the guest goes on.
When the process gets there the vCPU is in user mode, before that instruction, with the process's
real registers: GDB stops there. The process is then the scope (memory, breakpoints, libraries),
and GDB is told its libraries changed, so it loads what the process has mapped. One-shot: the
next exec of NAME is not caught unless asked again.
"""

from __future__ import annotations

import logging
import posixpath

from vmigdb.debugger import processes
from vmigdb.debugger.breakpoints import BreakpointLimitError
from vmigdb.debugger.catchpoints import Catchpoint, CatchStop, Hit, HitFilter
from vmigdb.debugger.guest_view import ANALYSIS_ERRORS, GuestUnavailable, GuestView
from vmigdb.guest.base import ExecEvent
from vmigdb.hv.base import DriverError

log = logging.getLogger("vmigdb.debugger")

EXEC, ENTRY = "exec", "entry"
COMM_LEN = 15  # TASK_COMM_LEN - 1: what the kernel keeps of a program's name


class CatchExecError(Exception):
    """The exec catchpoint cannot be armed; the message says why."""


def matches(name: str, event: ExecEvent) -> bool:
    """Does the program `event` runs answer to `name` (a path, or a file name)?"""
    if "/" in name:
        return event.path == name
    return posixpath.basename(event.path) == name or (
        not event.path and event.comm == name[:COMM_LEN]
    )


class ExecCatch(Catchpoint):
    kind = "exec"

    def __init__(self, guest: GuestView) -> None:
        super().__init__()
        self._guest = guest
        self.name: str | None = None
        self._caught: ExecEvent | None = None  # matched, on its way to its first instruction

    @property
    def armed(self) -> bool:
        return self.name is not None

    def status(self) -> str:
        if self.name is None:
            return "off"
        if self._caught is not None:
            ev = self._caught
            return (
                f"on: process {ev.pid} executed {ev.path or ev.comm}; stopping it at its first "
                f"instruction {ev.entry:#x}"
            )
        return (
            f"on: the next process that executes {self.name!r} stops before its first instruction"
        )

    def arm(self, name: str) -> str:
        """:raises CatchExecError: if the guest has no exec hook vmigdb can use"""
        assert self.hooks is not None
        self.clear()
        try:
            self.hooks.add(self._guest.os().exec_hook(), HitFilter(), EXEC)
        except GuestUnavailable as exc:
            raise CatchExecError(str(exc)) from None
        except (*ANALYSIS_ERRORS, BreakpointLimitError) as exc:
            raise CatchExecError(f"no exec hook: {exc}") from None
        self.name = name
        return self.status()

    def clear(self) -> None:
        super().clear()
        self.name = None
        self._caught = None

    def hit(self, hit: Hit) -> CatchStop | None:
        if hit.hook.tag == EXEC:
            return self._exec(hit)
        return self._first_instruction(hit)

    def _exec(self, hit: Hit) -> CatchStop | None:
        assert self.hooks is not None and self.name is not None
        try:
            event = self._guest.os().exec_event(hit.regs)
        except ANALYSIS_ERRORS as exc:
            log.info("an exec vmigdb could not read: %s", exc)
            return None
        if event is None or not matches(self.name, event):
            return None
        try:
            self.hooks.add(event.entry, HitFilter(cr3=event.cr3), ENTRY)
        except (BreakpointLimitError, DriverError) as exc:
            log.warning("cannot stop process %d at its first instruction: %s", event.pid, exc)
            return CatchStop(
                message=f"vmigdb: process {event.pid} executed {event.path}, but cannot be "
                f"stopped at its first instruction ({exc}); it is stopped in the kernel's exec"
            )
        self.hooks.remove(lambda hook: hook.tag == EXEC)  # one-shot: this is the one
        self._caught = event
        return None

    def _first_instruction(self, hit: Hit) -> CatchStop | None:
        event = self._caught
        self.clear()
        if event is None:
            return None
        guest_os = self._guest.os()
        try:
            scope = processes.scope_for(self._guest, str(event.pid))
        except (processes.ProcessNotFound, *ANALYSIS_ERRORS) as exc:
            return CatchStop(message=f"vmigdb: process {event.pid} ({event.comm}) is at its "
                             f"first instruction, but cannot be scoped: {exc}")  # fmt: skip
        lines = [
            f"vmigdb: process {event.pid} ({event.comm}) executed {event.path or event.comm}: "
            f"stopped before its first instruction, {hit.regs['rip']:#x}"
        ]
        try:
            info = guest_os.image_info(event.pid)
            start = "the dynamic loader's entry" if info.interpreter else "the program's entry"
            lines[0] += f" ({start})"
            loader = f"; dynamic loader loaded at {info.interpreter:#x}" if info.interpreter else ""
            lines.append(
                f"vmigdb: program entry point {info.entry:#x}, loaded at "
                f"{info.load_address:#x}{loader}"
            )
        except ANALYSIS_ERRORS as exc:
            lines.append(f"vmigdb: where the program is loaded could not be read: {exc}")
        lines.append(f"vmigdb: scope: process {event.pid} ({event.comm}); monitor info says so")
        return CatchStop(
            message="\n".join(lines), libraries_changed=True, scope=scope, set_scope=True
        )
