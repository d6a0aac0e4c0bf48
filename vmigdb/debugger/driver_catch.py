"""Catchpoints the hypervisor serves itself (e.g. Xen's MSR-write or exec-written events).

The driver declares its kinds (`Driver.catch_kinds`), arms them (`set_catch`, `clear_catch`), and
reports a hit as a `DriverStop` with a `DriverEvent`; run control turns that into a stop with its
message. The debugger's side is only bookkeeping: what is armed, for `monitor catch` and detach.
"""

from __future__ import annotations

from vmigdb.debugger.catchpoints import Catchpoint
from vmigdb.hv.base import Driver


class DriverCatch(Catchpoint):
    def __init__(self, driver: Driver, kind: str, usage: str) -> None:
        super().__init__()
        self._driver = driver
        self.kind = kind
        self.usage = usage
        self._status = "off"
        self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed

    def status(self) -> str:
        return self._status

    def set(self, args: list[str]) -> str:
        """`monitor catch KIND ARGS...` (``off`` disarms). :raises DriverError: with the usage"""
        if args == ["off"]:
            self.clear()
            return self._status
        self._status = self._driver.set_catch(self.kind, args)
        self._armed = True
        return self._status

    def clear(self) -> None:
        if self._armed:
            self._driver.clear_catch(self.kind)
        self._armed = False
        self._status = "off"
