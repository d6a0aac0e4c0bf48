"""Breakpoints and watchpoints as GDB asked for them, and lazily as the hypervisor holds them.

GDB removes every breakpoint at every stop and inserts them all again before it resumes. Passing that
churn through would cost two hypervisor calls per breakpoint per stop, and under TCG each change makes
QEMU throw away translated code (slow, and a timing footprint). So the table keeps what GDB wants
(`desired`) apart from what the hypervisor holds (`installed`): a Z inserts at once (so its errors reach
GDB's Z), a z only forgets, and removals reach the hypervisor when the guest is about to run. A z
followed by the same Z costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vmigdb.debugger.policy import StealthMode, StealthPolicy
from vmigdb.hv.base import BreakpointType, Capabilities, Driver, Mechanism, Unsupported

_JOBS = {
    BreakpointType.SOFTWARE: "software breakpoint",
    BreakpointType.HARDWARE: "hardware breakpoint",
    BreakpointType.WRITE_WATCH: "watchpoint",
    BreakpointType.READ_WATCH: "watchpoint",
    BreakpointType.ACCESS_WATCH: "watchpoint",
}

# A target-side condition: called with an evaluation context (registers, memory) of the vCPU that
# hit; non-zero means stop. Raising `ConditionError` means "cannot tell": the stop is reported and
# GDB decides. Any other exception is a bug (logged as an internal error; the stop is reported too).
Condition = Callable[[Any], int]


class ConditionError(Exception):
    """A condition could not be evaluated (unreadable memory, malformed bytecode...)."""


@dataclass(frozen=True, slots=True)
class Breakpoint:
    type: BreakpointType
    addr: int
    kind: int  # GDB's kind: instruction length for breakpoints, byte count for watchpoints
    # Target-side conditions (GDB's Z ...;X): the hit is reported if any is true, or if none is given.
    conditions: tuple[Condition, ...] = field(default=(), compare=False)
    # Process scope: the hit counts only when the vCPU's page-table base (CR3 without PCID/PTI
    # bits) is this one. Set from the session's scope when the breakpoint is first created.
    scope_cr3: int | None = field(default=None, compare=False)
    # The mechanism serving it when not its type's default (the stealth policy's fallback).
    mechanism: str | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[int, int, int]:
        return (int(self.type), self.addr, self.kind)


def _codes(bp: Breakpoint) -> tuple[bytes, ...] | None:
    """The conditions' agent bytecode, for a driver that evaluates them itself; None when one
    has none (a condition built in vmigdb only)."""
    codes = tuple(getattr(condition, "code", None) for condition in bp.conditions)
    return None if None in codes else codes  # type: ignore[return-value]


class BreakpointLimitError(Exception):
    """The mechanism serving this request has no free slot (e.g. 4 debug registers under KVM)."""


class UnsupportedBreakpoint(Unsupported):
    """The driver offers no mechanism for this breakpoint type."""

    def __init__(self, driver: str, type: BreakpointType) -> None:
        super().__init__(f"the {driver} driver has no {_JOBS[type]}s")
        self.type = type


class BreakpointTable:
    def __init__(self, driver: Driver, policy: StealthPolicy | None = None) -> None:
        self._driver = driver
        self._caps: Capabilities = driver.capabilities
        self._policy = policy or StealthPolicy(StealthMode.DEFAULT, driver.capabilities)
        self.desired: dict[tuple[int, int, int], Breakpoint] = {}
        self.installed: dict[tuple[int, int, int], Breakpoint] = {}
        # vmigdb's own breakpoints, never shown to GDB, each with the owners that want it
        # ("range": range-stepping exits; "scope": the scoped process's exit hook)
        self.internal: dict[tuple[int, int, int], set[str]] = {}
        self.changes = 0  # hypervisor-side insertions and removals so far (the step quirk needs it)

    def mechanism_of(self, bp: Breakpoint) -> Mechanism | None:
        fallback = self._caps.sw_breakpoint_fallback
        if bp.mechanism is not None and fallback is not None and bp.mechanism == fallback.key:
            return fallback
        return self.mechanism(bp.type)

    def mechanism(self, type: BreakpointType) -> Mechanism | None:
        if type == BreakpointType.SOFTWARE:
            return self._caps.sw_breakpoint
        if type == BreakpointType.HARDWARE:
            return self._caps.hw_breakpoint
        return self._caps.watchpoint

    def add(self, bp: Breakpoint) -> None:
        """Idempotent, like GDB expects of Z; a Z again with other conditions replaces them.

        GDB re-sends Z for every breakpoint before each resume: a breakpoint it already had keeps
        the process scope it was created in, whatever the scope is now.
        """
        previous = self.desired.get(bp.key) or self.installed.get(bp.key)
        if previous is not None:
            bp = replace(bp, scope_cr3=previous.scope_cr3, mechanism=previous.mechanism)
        installed = self.installed.get(bp.key)
        if installed is not None and self._driver.decides_conditions:
            if _codes(installed) != _codes(bp):  # the driver holds other conditions: replace them
                self._insert(bp)
                self.installed[bp.key] = bp
        if bp.key in self.desired:
            self.desired[bp.key] = bp
            return
        if installed is None:
            bp = self._choose_mechanism(bp)
        self._install(bp)
        self.desired[bp.key] = bp

    def _choose_mechanism(self, bp: Breakpoint) -> Breakpoint:
        """The invisible mechanism if it has room, else the fallback the policy allows."""
        mechanism = self.mechanism(bp.type)
        if mechanism is None:
            raise UnsupportedBreakpoint(self._driver.name, bp.type)
        if mechanism.limit is not None and self._slots_used(mechanism, bp) > mechanism.limit:
            self.sync()  # lazily removed breakpoints still hold slots: give them back first
            if self._slots_used(mechanism, bp) > mechanism.limit:
                fallback = self._caps.sw_breakpoint_fallback
                if bp.type != BreakpointType.SOFTWARE or fallback is None:
                    raise BreakpointLimitError(
                        f"all {mechanism.limit} slots of {mechanism.key} are in use"
                    )
                self._policy.use("software breakpoint (fallback)", fallback)
                return replace(bp, mechanism=fallback.key)
        self._policy.use(_JOBS[bp.type], mechanism)
        return bp

    def _install(self, bp: Breakpoint) -> None:
        if bp.key not in self.installed:
            self._insert(bp)
            self.installed[bp.key] = bp
            self.changes += 1

    def _insert(self, bp: Breakpoint) -> None:
        codes = _codes(bp)
        if self._driver.decides_conditions and codes is not None and bp.conditions:
            self._driver.insert_breakpoint(
                bp.type, bp.addr, bp.kind, bp.mechanism, scope_cr3=bp.scope_cr3, conditions=codes
            )
        elif bp.scope_cr3 is not None:
            self._driver.insert_breakpoint(
                bp.type, bp.addr, bp.kind, bp.mechanism, scope_cr3=bp.scope_cr3
            )
        elif bp.mechanism is None:
            self._driver.insert_breakpoint(bp.type, bp.addr, bp.kind)
        else:
            self._driver.insert_breakpoint(bp.type, bp.addr, bp.kind, bp.mechanism)

    def add_internal(self, addr: int, owner: str) -> None:
        """An execution breakpoint of vmigdb's own (raises like `add` when out of slots)."""
        bp = Breakpoint(BreakpointType.SOFTWARE, addr, 1)
        if bp.key in self.internal:
            self.internal[bp.key].add(owner)
            return
        mechanism = self.mechanism(bp.type)
        if mechanism is None:
            raise UnsupportedBreakpoint(self._driver.name, bp.type)
        if mechanism.limit is not None and self._slots_used(mechanism, bp) > mechanism.limit:
            raise BreakpointLimitError(f"all {mechanism.limit} slots of {mechanism.key} are in use")
        self._install(bp)
        self.internal[bp.key] = {owner}

    def release_internal(self, owner: str) -> None:
        """Forget `owner`'s breakpoints; the hypervisor drops unwanted ones at the next sync."""
        for key in list(self.internal):
            self.internal[key].discard(owner)
            if not self.internal[key]:
                del self.internal[key]

    def internal_at(self, addr: int, owner: str | None = None) -> bool:
        owners = self.internal.get((int(BreakpointType.SOFTWARE), addr, 1), set())
        return bool(owners) if owner is None else owner in owners

    def installed_at(self, addr: int) -> bool:
        """Does the hypervisor hold an execution breakpoint at `addr` (GDB's or ours)?"""
        return any(bp.addr == addr and not bp.type.is_watchpoint for bp in self.installed.values())

    def _slots_used(self, mechanism: Mechanism, new: Breakpoint) -> int:
        """Slots of `mechanism` in use (held by the hypervisor or wanted by GDB) once `new` is in."""
        keys = self.desired.keys() | self.installed.keys() | self.internal.keys() | {new.key}
        internal = {
            key: Breakpoint(BreakpointType(key[0]), key[1], key[2]) for key in self.internal
        }
        held = {**self.installed, **internal, **self.desired, new.key: new}
        return sum(1 for key in keys if self.mechanism_of(held[key]) == mechanism)

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
        stale = [k for k in self.installed if k not in self.desired and k not in self.internal]
        for key in stale:
            bp = self.installed.pop(key)
            self._driver.remove_breakpoint(bp.type, bp.addr, bp.kind)
            self.changes += 1
        return bool(stale)
