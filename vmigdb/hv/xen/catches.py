"""The Xen driver's catchpoints: MSR writes, and execution of pages written since they last ran.

msr-write: one libvmi register event per MSR a rootkit rewrites to hook system calls (LSTAR,
CSTAR, the SYSENTER MSRs). libvmi refuses a specific-MSR constant (`MSR.LSTAR`) for an event: the
event is `MSR.ANY` with the architectural index in the cffi event's `reg_event.msr` (the wheel's
`to_cffi` leaves that field alone).

exec-written ("current executable pages", how packed code reveals itself): every page of guest
RAM is either executable (writes trap) or written (execution traps), in every guest view. A write
to an executable page makes it written, silently; execution in a written page makes it
executable again and stops GDB at that first instruction (only in the scoped address space, if
one was given). Each page traps once per write/execute alternation.
"""

from __future__ import annotations

from typing import Any

from vmigdb.hv.base import CatchKind, DriverError, DriverStop
from vmigdb.hv.xen.targets import cr3_base
from vmigdb.hv.xen.views import PAGE, W, X

SIGTRAP = 5
EXEC_USER = "exec-written"
MSRS = {
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0x174: "SYSENTER_CS",
    0x175: "SYSENTER_ESP",
    0x176: "SYSENTER_EIP",
}
CATCHPOINTS = (
    CatchKind("msr-write", "stop when the guest writes LSTAR, CSTAR or a SYSENTER MSR"),
    CatchKind(
        "exec-written",
        "stop at the first instruction the guest executes in a page written since it last ran",
        scoped=True,
    ),
)


class ExecWritten:
    def __init__(self, scope: int | None, pages: int) -> None:
        self.scope = scope
        self.written: set[int] = set()  # the rest of RAM is executable
        self.pages = pages


class Catches:
    def __init__(self, engine: Any) -> None:
        self._e = engine  # the Engine that owns this (no import: engine.py imports this module)
        self.msr_events: list = []
        self.exec_written: ExecWritten | None = None

    def set(self, name: str, on: bool, scope: int | None) -> str:
        if name == "msr-write":
            return self._msr(on)
        if name == "exec-written":
            return self._exec(on, scope)
        raise DriverError(f"the xen driver has no catchpoint {name!r}")

    # -- msr-write ------------------------------------------------------------------------------------

    def _msr(self, on: bool) -> str:
        e = self._e
        if on and not self.msr_events:
            E, L = e.b.event, e.b.libvmi
            for index in MSRS:
                event = E.RegEvent(L.MSR.ANY, E.RegAccess.W, e._guarded(self._on_msr))
                event.cffi_event.reg_event.msr = index
                try:
                    e.vmi.register_event(event)
                except L.LibvmiError as exc:
                    self._msr(False)
                    raise DriverError(f"libvmi refused an MSR-write event: {exc}") from None
                self.msr_events.append(event)
        elif not on:
            for event in self.msr_events:
                try:
                    e.vmi.clear_event(event)
                except e.b.libvmi.LibvmiError:
                    pass
            self.msr_events = []
        if not self.msr_events:
            return "off"
        return f"on: GDB stops when the guest writes {', '.join(MSRS.values())}"

    def _on_msr(self, event) -> None:
        index = event.msr
        name = MSRS.get(index, f"{index:#x}")
        cpu = event.vcpu_id
        message = (
            f"vmigdb: CPU#{cpu} wrote MSR {name} ({index:#x}): {event.previous:#x} -> "
            f"{event.value:#x} (monitor catch msr-write)"
        )
        self._e._stop_here(
            DriverStop(cpu + 1, SIGTRAP, catch="msr-write", message=message), queue=True
        )

    # -- exec-written ---------------------------------------------------------------------------------

    def _exec(self, on: bool, scope: int | None) -> str:
        e = self._e
        if self.exec_written is not None:
            for gfn in range(self.exec_written.pages):
                e.views.traps.want(gfn, EXEC_USER, 0)
            self.exec_written = None
        if not on:
            return "off"
        e.activate()
        state = ExecWritten(cr3_base(scope) if scope is not None else None, e.ram_end // PAGE)
        for gfn in range(state.pages):
            e.views.traps.want(gfn, EXEC_USER, W)
        self.exec_written = state
        where = f"address space {state.scope:#x}" if state.scope is not None else "every process"
        return (
            f"on ({where}): GDB stops at the first instruction executed in a page written since "
            f"it last ran ({state.pages} pages tracked)"
        )

    def written(self, gfn: int) -> None:
        state = self.exec_written
        if state is not None and gfn < state.pages and gfn not in state.written:
            state.written.add(gfn)
            self._e.views.traps.want(gfn, EXEC_USER, X)

    def executed(self, cpu: int, gfn: int, cr3: int, rip: int) -> DriverStop | None:
        state = self.exec_written
        if state is None or gfn not in state.written:
            return None
        state.written.discard(gfn)
        self._e.views.traps.want(gfn, EXEC_USER, W)
        if state.scope is not None and cr3_base(cr3) != state.scope:
            return None
        message = (
            f"vmigdb: CPU#{cpu - 1} executes {rip:#x} in guest-physical page {gfn * PAGE:#x}, "
            "written since it last ran (monitor catch exec-written)"
        )
        return DriverStop(cpu, SIGTRAP, catch="exec-written", message=message)

    # -- all ------------------------------------------------------------------------------------------

    def clear(self) -> None:
        self._msr(False)
        if self.exec_written is not None:
            self._exec(False, None)

    def describe(self) -> list[str]:
        out = []
        if self.msr_events:
            out.append(f"MSR writes ({', '.join(MSRS.values())})")
        if self.exec_written is not None:
            out.append(f"exec-written ({len(self.exec_written.written)} page(s) written)")
        return out
