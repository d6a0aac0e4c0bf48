"""Breakpoints and watchpoints as GDB asked for them, and lazily as the hypervisor holds them.

GDB removes every breakpoint at every stop and inserts them all again before it resumes. Passing that
churn through would cost two hypervisor calls per breakpoint per stop, and under TCG each change makes
QEMU throw away translated code (slow, and a timing footprint). So the table keeps what GDB wants
(`desired`) apart from what the hypervisor holds (`installed`): a Z inserts at once (so its errors reach
GDB's Z), a z only forgets, and removals reach the hypervisor when the guest is about to run. A z
followed by the same Z costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigdb.hv.base import BreakpointType, Capabilities, Driver, Mechanism


@dataclass(frozen=True, slots=True)
class Breakpoint:
    type: BreakpointType
    addr: int
    kind: int  # GDB's kind: instruction length for breakpoints, byte count for watchpoints

    @property
    def key(self) -> tuple[int, int, int]:
        return (int(self.type), self.addr, self.kind)


class BreakpointLimitError(Exception):
    """The mechanism serving this request has no free slot (e.g. 4 debug registers under KVM)."""


class UnsupportedBreakpoint(Exception):
    """The driver offers no mechanism for this breakpoint type."""


class BreakpointTable:
    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._caps: Capabilities = driver.capabilities
        self.desired: dict[tuple[int, int, int], Breakpoint] = {}
        self.installed: dict[tuple[int, int, int], Breakpoint] = {}
        self.changes = 0  # hypervisor-side insertions and removals so far (the step quirk needs it)

    def mechanism(self, type: BreakpointType) -> Mechanism | None:
        if type == BreakpointType.SOFTWARE:
            return self._caps.sw_breakpoint
        if type == BreakpointType.HARDWARE:
            return self._caps.hw_breakpoint
        return self._caps.watchpoint

    def add(self, bp: Breakpoint) -> None:
        """Idempotent, like GDB expects of Z."""
        if bp.key in self.desired:
            return
        mechanism = self.mechanism(bp.type)
        if mechanism is None:
            raise UnsupportedBreakpoint(bp.type)
        if mechanism.limit is not None and self._slots_used(mechanism, bp) > mechanism.limit:
            self.sync()  # lazily removed breakpoints still hold slots: give them back first
            if self._slots_used(mechanism, bp) > mechanism.limit:
                raise BreakpointLimitError(
                    f"all {mechanism.limit} slots of {mechanism.key} are in use"
                )
        if bp.key not in self.installed:
            self._driver.insert_breakpoint(bp.type, bp.addr, bp.kind)
            self.installed[bp.key] = bp
            self.changes += 1
        self.desired[bp.key] = bp

    def _slots_used(self, mechanism: Mechanism, new: Breakpoint) -> int:
        """Slots of `mechanism` in use (held by the hypervisor or wanted by GDB) once `new` is in."""
        keys = self.desired.keys() | self.installed.keys() | {new.key}
        held = {**self.installed, **self.desired, new.key: new}
        return sum(1 for key in keys if self.mechanism(held[key].type) == mechanism)

    def remove(self, bp: Breakpoint) -> None:
        """Idempotent, like GDB expects of z."""
        self.desired.pop(bp.key, None)

    def clear(self) -> None:
        self.desired.clear()

    def at(self, addr: int) -> list[Breakpoint]:
        """Execution breakpoints GDB placed at `addr`."""
        return [bp for bp in self.desired.values() if bp.addr == addr and not bp.type.is_watchpoint]

    def sync(self) -> bool:
        """Remove from the hypervisor what GDB no longer wants. Returns True if anything changed."""
        stale = [key for key in self.installed if key not in self.desired]
        for key in stale:
            bp = self.installed.pop(key)
            self._driver.remove_breakpoint(bp.type, bp.addr, bp.kind)
            self.changes += 1
        return bool(stale)
