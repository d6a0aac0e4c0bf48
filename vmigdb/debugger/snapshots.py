"""Snapshots in debugger terms: save and load the whole VM while GDB holds it stopped.

The hypervisor does the saving (`Driver.snapshots`); this module keeps the debugger true to the
machine across a load:
- registers and translations cached for the old state are dropped, and so are the guest OS's
  cached reads (its kernel is the same one: a snapshot belongs to the running VM);
- the breakpoints GDB holds stay in force (the hypervisor holds them outside the VM state);
- the process scope is re-resolved by pid and name in the loaded memory, or dropped, with a
  message;
- GDB, which cannot be told of a new state outside a stop reply, gets a stop at the snapshot's
  state at its next `continue` or `stepi`, before any guest code runs (`RunControl.arrive`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vmigdb.debugger import processes
from vmigdb.debugger.events import StopEvent, StopReason
from vmigdb.debugger.guest_view import GuestUnavailable, GuestView
from vmigdb.debugger.scope import ScopeWatch
from vmigdb.debugger.state import MachineState
from vmigdb.debugger.stops import RunControl
from vmigdb.guest.base import GuestError
from vmigdb.hv.base import Driver, DriverError, SnapshotInfo

log = logging.getLogger("vmigdb.debugger")

NO_SIGNAL = 0  # the arrival stop: GDB shows "stopped", not a signal the guest never got


class SnapshotError(Exception):
    """A snapshot could not be taken, loaded or listed; the message says why."""


@dataclass(frozen=True)
class Loaded:
    name: str
    seconds: float
    scope_note: str | None  # what became of the process scope, if there was one
    caveat: str | None = None  # what the load could not put back (the hypervisor says)


class SnapshotControl:
    def __init__(
        self,
        driver: Driver,
        state: MachineState,
        guest: GuestView,
        scope: ScopeWatch,
        run_control: RunControl,
    ) -> None:
        self._driver = driver
        self._state = state
        self._guest = guest
        self._scope = scope
        self._run = run_control

    @property
    def available(self) -> bool:
        return self._driver.snapshots is not None

    def _store(self):
        store = self._driver.snapshots
        if store is None:
            raise SnapshotError(f"the {self._driver.name} driver keeps no snapshots")
        if self._run.running:
            raise SnapshotError("the guest is running: snapshots are taken while it is stopped")
        return store

    async def save(self, name: str) -> float:
        try:
            return await self._store().save(name)
        except DriverError as exc:
            raise SnapshotError(str(exc)) from None

    async def delete(self, name: str) -> float:
        try:
            return await self._store().delete(name)
        except DriverError as exc:
            raise SnapshotError(str(exc)) from None

    async def list(self) -> list[SnapshotInfo]:
        try:
            return await self._store().list()
        except DriverError as exc:
            raise SnapshotError(str(exc)) from None

    async def load(self, name: str) -> Loaded:
        store = self._store()
        scope = self._scope.current
        try:
            seconds = await store.load(name)
        except DriverError as exc:
            # QEMU may have loaded part of the state before failing: nothing cached is trusted.
            self._forget()
            raise SnapshotError(str(exc)) from None
        self._forget()
        note = self._rescope(scope) if scope is not None else None
        last = self._run.last_stop
        cpus = self._state.cpus()
        cpu = last.cpu if last is not None and last.cpu in cpus else cpus[0]
        message = f"vmigdb: the guest is at snapshot {name}'s state (loaded); no guest code ran"
        self._run.arrive(
            StopEvent(
                StopReason.SIGNAL,
                cpu,
                NO_SIGNAL,
                registers=self._state.registers(cpu),
                message=message,
            )
        )
        return Loaded(name, seconds, note, store.load_caveat())

    def _forget(self) -> None:
        self._state.forget()
        self._guest.ran()

    def _rescope(self, old) -> str:
        """The scoped process in the loaded state: the same pid with the same name, or none."""
        started = time.monotonic()
        try:
            new = processes.scope_for(self._guest, str(old.pid))
        except (processes.ProcessNotFound, GuestUnavailable, GuestError) as exc:
            self._scope.set(None)
            return f"scope dropped: process {old.pid} ({old.comm}) is not in the snapshot ({exc})"
        if new.comm != old.comm:
            self._scope.set(None)
            return (
                f"scope dropped: pid {old.pid} is {new.comm!r} in the snapshot, not {old.comm!r}; "
                "the whole machine is in scope"
            )
        self._scope.set(new)
        log.debug("scope re-resolved in %.3f s", time.monotonic() - started)
        moved = "" if new.cr3 == old.cr3 else f" (page tables now at {new.cr3:#x})"
        return f"scope: process {new.pid} ({new.comm}) again{moved}"
