"""Catchpoints the hypervisor serves itself (e.g. Xen's MSR-write or exec-written events).

The driver declares its kinds (`Driver.catchpoints`), arms and disarms them (`set_catch`), and
reports a hit as a `DriverStop` whose `catch` names the kind and whose `message` says what
happened; run control reports that stop as it is, never filtered. The debugger's side is only
bookkeeping: what is armed, for `monitor catch` and for detach (a detached guest carries nothing
of the debugger).
"""

from __future__ import annotations

import logging

from vmigdb.debugger.catchpoints import Catchpoint
from vmigdb.hv.base import CatchKind, Driver, DriverError

log = logging.getLogger("vmigdb.debugger")


class DriverCatch(Catchpoint):
    def __init__(self, driver: Driver, kind: CatchKind) -> None:
        super().__init__()
        self._driver = driver
        self.kind = kind.name
        self.help = kind.help
        self.scoped = kind.scoped  # takes a process (an address space) to watch
        self._status = "off"
        self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed

    def status(self) -> str:
        return self._status

    def set(self, on: bool, scope_cr3: int | None = None) -> str:
        """Arm (in the address space at `scope_cr3`, if given) or disarm; returns the driver's
        status line. :raises DriverError: with the reason (the state is unchanged then)"""
        if scope_cr3 is not None and not self.scoped:
            raise DriverError(f"catch {self.kind} watches the whole machine; it takes no process")
        status = self._driver.set_catch(self.kind, on, scope_cr3)
        self._armed = on
        self._status = status if on else "off"
        return status

    def clear(self) -> None:
        if self._armed:
            try:
                self._driver.set_catch(self.kind, False)
            except DriverError as exc:
                log.error("could not disarm catch %s: %s", self.kind, exc)
        self._armed = False
        self._status = "off"
