"""GDB learns of every library a scoped process loads, as with a native Linux process.

GDB's own SVR4 support puts a breakpoint on the dynamic loader's ``_dl_debug_state`` and reads
the library list each time it is hit. Here that hook is vmigdb's (`GuestOS.loader_hook`, for the
scoped process's page tables only), placed whenever a process is in scope: each hit is reported
as a library stop alone (GDB reads the list again, loads the new objects' symbols, resolves
pending breakpoints such as `break puts` set before libc was there, and resumes), never as a
stop of its own. A static program has no loader: nothing to watch.
"""

from __future__ import annotations

import logging

from vmigdb.debugger.breakpoints import BreakpointLimitError
from vmigdb.debugger.catchpoints import Catchpoint, CatchStop, Hit, HitFilter
from vmigdb.debugger.guest_view import ANALYSIS_ERRORS, GuestView
from vmigdb.debugger.model import ProcessScope
from vmigdb.debugger.scope import ScopeWatch
from vmigdb.hv.base import DriverError

log = logging.getLogger("vmigdb.debugger")


class LibraryWatch(Catchpoint):
    kind = "libraries"

    def __init__(self, guest: GuestView, scope: ScopeWatch) -> None:
        super().__init__()
        self._guest = guest
        self._scope = scope
        self._watching: tuple[int, int] | None = None  # (pid, cr3): a new program is a new key
        self._why = "no process in scope"

    @property
    def armed(self) -> bool:
        return bool(self.hooks and self.hooks.hooks)

    def status(self) -> str:
        scope = self._scope.current
        if ((scope.pid, scope.cr3) if scope else None) != self._watching:
            return "on: follows the process scope, from the guest's next run"
        if self.armed and self._watching is not None:
            return (
                f"on: GDB learns of each library process {self._watching[0]} loads (a hook on "
                "its dynamic loader)"
            )
        return f"off: {self._why}"

    def resuming(self, scope: ProcessScope | None) -> None:
        key = (scope.pid, scope.cr3) if scope is not None else None
        if key == self._watching:
            return
        self.clear()
        self._watching = key
        if scope is None or not self._guest.available():
            return
        try:
            address = self._guest.os().loader_hook(scope.pid)
        except ANALYSIS_ERRORS as exc:
            self._why = f"process {scope.pid}'s dynamic loader could not be read: {exc}"
            log.info("%s", self._why)
            return
        if address is None:
            self._why = f"process {scope.pid} has no dynamic loader (a static program)"
            return
        assert self.hooks is not None
        try:
            self.hooks.add(address, HitFilter(cr3=scope.cr3), "loader")
        except (BreakpointLimitError, DriverError) as exc:
            self._why = f"no hook on process {scope.pid}'s dynamic loader: {exc}"
            log.info("%s", self._why)

    def clear(self) -> None:
        super().clear()
        self._watching = None
        self._why = "no process in scope"

    def hit(self, hit: Hit) -> CatchStop | None:
        return CatchStop(libraries_changed=True, libraries_only=True)
