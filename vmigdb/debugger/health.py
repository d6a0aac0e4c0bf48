"""`monitor catch panic`: the guest's health, watched while GDB is attached.

A catchpoint (kind "panic") with hooks on the guest kernel's oops and panic entry points (found in
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
from vmigdb.debugger.catchpoints import Catchpoint, CatchStop, Hit, HitFilter
from vmigdb.debugger.guest_view import GuestUnavailable
from vmigdb.guest.base import DeathHook
from vmigdb.hv.base import BreakpointType, DriverError

if TYPE_CHECKING:
    from vmigdb.debugger.breakpoints import BreakpointTable
    from vmigdb.debugger.guest_view import GuestView

log = logging.getLogger("vmigdb.debugger")


class HealthWatch(Catchpoint):
    kind = "panic"

    def __init__(self, breakpoints: BreakpointTable, guest: GuestView) -> None:
        super().__init__()
        self._guest = guest
        mechanism = breakpoints.mechanism(BreakpointType.SOFTWARE)
        self.enabled = mechanism is not None and mechanism.limit is None
        self.death_hooks: dict[int, DeathHook] = {}
        self._status = "on: armed when the guest next runs" if self.enabled else "off"

    @property
    def armed(self) -> bool:
        return bool(self.death_hooks)

    def status(self) -> str:
        return self._status

    def arm(self) -> str:
        """(Re)place the hooks if enabled; returns a one-line status for `monitor catch`."""
        assert self.hooks is not None
        self.disarm()
        if not self.enabled:
            self._status = "off"
            return self._status
        try:
            hooks = self._guest.os().death_hooks()
        except GuestUnavailable as exc:
            self._status = f"on, but not armed: {exc}"
            return self._status
        try:
            for hook in hooks:
                self.hooks.add(hook.address, HitFilter(), hook.symbol)
                self.death_hooks[hook.address] = hook
        except (BreakpointLimitError, DriverError) as exc:
            self.disarm()
            self._status = f"on, but not armed: {exc}"
            return self._status
        names = ", ".join(h.symbol for h in hooks) or "none found"
        self._status = f"on: GDB stops when the guest kernel oopses or panics ({names})"
        return self._status

    def disarm(self) -> None:
        super().clear()
        self.death_hooks.clear()

    def clear(self) -> None:
        self.disarm()

    def hit(self, hit: Hit) -> CatchStop | None:
        """At one of the hooks: the console line saying what is happening."""
        hook = self.death_hooks.get(hit.hook.address)
        if hook is None:
            return None
        cpu = hit.cpu
        try:
            what = self._guest.os().describe_death(hook, hit.regs, f"CPU#{cpu - 1}")
        except Exception as exc:  # noqa: BLE001 - the stop matters more than its description
            log.info("could not describe the guest's death: %s", exc)
            what = f"the guest kernel is dying ({hook.symbol}) on CPU#{cpu - 1}"
        return CatchStop(
            message=f"vmigdb: {what}. (monitor catch panic off: let it go without stopping)"
        )
