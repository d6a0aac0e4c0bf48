"""`monitor catch module [NAME]`: stop when a kernel module loads, its symbols known, its init
function not yet run, so a breakpoint on the init function can be set.

A hook on the kernel's module-init path (`GuestOS.module_load_hook`). At the stop GDB is told the
library list changed: in kernel scope each module is a library of its own, so GDB loads the new
module's symbols before the prompt. A process in scope is left for the whole machine (the
module's symbols live there). Stays armed until `monitor catch module off`.
"""

from __future__ import annotations

import logging

from vmigdb.debugger.breakpoints import BreakpointLimitError
from vmigdb.debugger.catchpoints import Catchpoint, CatchStop, Hit, HitFilter
from vmigdb.debugger.guest_view import ANALYSIS_ERRORS, GuestUnavailable, GuestView
from vmigdb.debugger.scope import ScopeWatch

log = logging.getLogger("vmigdb.debugger")


class CatchModuleError(Exception):
    """The module catchpoint cannot be armed; the message says why."""


class ModuleCatch(Catchpoint):
    kind = "module"

    def __init__(self, guest: GuestView, scope: ScopeWatch) -> None:
        super().__init__()
        self._guest = guest
        self._scope = scope
        self.enabled = False
        self.name: str | None = None  # None: every module

    @property
    def armed(self) -> bool:
        return self.enabled

    def status(self) -> str:
        if not self.enabled:
            return "off"
        which = f"module {self.name!r}" if self.name else "every module"
        return f"on: GDB stops when {which} loads, before its init function runs"

    def arm(self, name: str | None) -> str:
        """:raises CatchModuleError: if the guest has no module-load hook"""
        assert self.hooks is not None
        self.clear()
        try:
            self.hooks.add(self._guest.os().module_load_hook(), HitFilter(), "load")
        except GuestUnavailable as exc:
            raise CatchModuleError(str(exc)) from None
        except (*ANALYSIS_ERRORS, BreakpointLimitError) as exc:
            raise CatchModuleError(f"no module-load hook: {exc}") from None
        self.enabled = True
        self.name = name
        return self.status()

    def clear(self) -> None:
        super().clear()
        self.enabled = False
        self.name = None

    def hit(self, hit: Hit) -> CatchStop | None:
        try:
            event = self._guest.os().module_load_event(hit.regs)
        except ANALYSIS_ERRORS as exc:
            log.info("a module load vmigdb could not read: %s", exc)
            return None
        if event is None or (self.name is not None and event.name != self.name):
            return None
        init = (
            f"its init function, at {event.init:#x}, has not run yet"
            if event.init
            else "it has no init function"
        )
        message = (
            f"vmigdb: module {event.name} loaded at {event.base:#x} ({event.size} bytes); {init}"
        )
        scope = self._scope.current
        if scope is not None:
            message += (
                f"\nvmigdb: scope: the whole machine (was process {scope.pid}): the module's "
                "symbols are there"
            )
        return CatchStop(message=message, libraries_changed=True, scope=None, set_scope=True)
