"""`monitor catch panic`: the guest's health, watched while GDB is attached.

vmigdb places breakpoints of its own on the guest kernel's oops and panic entry points (found in
kallsyms, served by the same invisible mechanism as any breakpoint). When the guest starts dying,
GDB stops there with the dying vCPU's registers and a console line saying what is happening,
instead of finding a dead machine later. On by default where breakpoints are unlimited; under a
driver whose breakpoints are a few hardware slots (KVM) it is off unless asked for, since it would
take two of them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vmigdb.debugger.breakpoints import BreakpointLimitError
from vmigdb.debugger.guest_view import GuestUnavailable
from vmigdb.guest.base import DeathHook
from vmigdb.hv.base import BreakpointType, DriverError

if TYPE_CHECKING:
    from vmigdb.arch.x86_64.registers import RegisterFile
    from vmigdb.debugger.breakpoints import BreakpointTable
    from vmigdb.debugger.guest_view import GuestView

log = logging.getLogger("vmigdb.debugger")

OWNER = "panic"


class HealthWatch:
    def __init__(self, breakpoints: BreakpointTable, guest: GuestView) -> None:
        self._breakpoints = breakpoints
        self._guest = guest
        mechanism = breakpoints.mechanism(BreakpointType.SOFTWARE)
        self.enabled = mechanism is not None and mechanism.limit is None
        self.hooks: dict[int, DeathHook] = {}
        self.status = "on: armed when the guest next runs" if self.enabled else "off"

    def arm(self) -> str:
        """(Re)place the hooks if enabled; returns a one-line status for `monitor catch`."""
        self.disarm()
        if not self.enabled:
            self.status = "off"
            return self.status
        try:
            hooks = self._guest.os().death_hooks()
        except GuestUnavailable as exc:
            self.status = f"on, but not armed: {exc}"
            return self.status
        try:
            for hook in hooks:
                self._breakpoints.add_internal(hook.address, OWNER)
                self.hooks[hook.address] = hook
        except (BreakpointLimitError, DriverError) as exc:
            self.disarm()
            self.status = f"on, but not armed: {exc}"
            return self.status
        names = ", ".join(h.symbol for h in hooks) or "none found"
        self.status = f"on: GDB stops when the guest kernel oopses or panics ({names})"
        return self.status

    def disarm(self) -> None:
        self._breakpoints.release_internal(OWNER)
        self.hooks.clear()

    def dying(self, rip: int, regs: RegisterFile, cpu: int) -> str | None:
        """At one of the hooks: the console line saying what is happening, else None."""
        hook = self.hooks.get(rip)
        if hook is None or not self._breakpoints.internal_at(rip, OWNER):
            return None
        try:
            what = self._guest.os().describe_death(hook, regs, f"CPU#{cpu - 1}")
        except Exception as exc:  # noqa: BLE001 - the stop matters more than its description
            log.info("could not describe the guest's death: %s", exc)
            what = f"the guest kernel is dying ({hook.symbol}) on CPU#{cpu - 1}"
        return f"vmigdb: {what}. (monitor catch panic off: let it go without stopping)"
