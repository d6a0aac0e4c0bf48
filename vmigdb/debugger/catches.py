"""Driver catchpoints (`monitor catch NAME`): guest events the hypervisor stops on by itself.

A driver declares the events it can catch (`Driver.catchpoints`, e.g. Xen's MSR-write intercept);
this table remembers which are armed, so `monitor catch` can list them and a detach disarms them:
a detached guest carries nothing of the debugger. A catch stop reaches GDB as it is (`DriverStop.catch`,
reported by `RunControl` with the driver's message), never filtered.
"""

from __future__ import annotations

import logging

from vmigdb.hv.base import Catchpoint, Driver, DriverError

log = logging.getLogger("vmigdb.debugger")


class UnknownCatchpoint(Exception):
    """No catchpoint has that name; the message lists the known ones."""


class CatchTable:
    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self.armed: dict[str, str] = {}  # name -> the status the driver gave when arming it

    def available(self) -> tuple[Catchpoint, ...]:
        return self._driver.catchpoints()

    def find(self, name: str) -> Catchpoint:
        for catchpoint in self.available():
            if catchpoint.name == name:
                return catchpoint
        known = ", ".join(c.name for c in self.available()) or "none"
        raise UnknownCatchpoint(
            f"the {self._driver.name} driver has no catchpoint {name!r} (it has: {known})"
        )

    def set(self, name: str, on: bool, scope_cr3: int | None = None) -> str:
        """Arm or disarm `name`; returns the driver's status line. :raises DriverError:"""
        catchpoint = self.find(name)
        if scope_cr3 is not None and not catchpoint.scoped:
            raise DriverError(f"catch {name} watches the whole machine; it takes no process")
        status = self._driver.set_catch(name, on, scope_cr3)
        if on:
            self.armed[name] = status
        else:
            self.armed.pop(name, None)
        return status

    def status(self, name: str) -> str:
        return self.armed.get(name, "off")

    def clear(self) -> None:
        """Disarm every catchpoint (at detach)."""
        for name in list(self.armed):
            try:
                self._driver.set_catch(name, False)
            except DriverError as exc:
                log.error("could not disarm catch %s: %s", name, exc)
        self.armed.clear()
