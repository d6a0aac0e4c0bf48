"""Catchpoints: stops GDB wants for events rather than addresses (a system call, an exec, a module
load, a dying kernel, or an event the hypervisor itself catches).

The model, for every kind:

- A `Catchpoint` has a `kind` (``"syscall"``, ``"exec"``, ``"module"``, ``"panic"``, or a driver's
  own such as ``"msr-write"``), a one-line `status`, and is armed or not.
- A guest-side catchpoint watches the guest through *hooks*: breakpoints of vmigdb's own on
  kernel (or user) code, each with a `HitFilter` that says, from the hitting vCPU's registers
  alone, which hits matter (its page-table base, its stack pointer). Hits the filter rejects
  never reach the catchpoint; the guest runs on. The filter is data on purpose: a hypervisor
  that decides hits itself (issue 16's TCG plugin) can take `CatchpointTable.hooks()` over as is,
  and then a rejected hit costs no VM stop at all.
- At an accepted hit the catchpoint decides (`Catchpoint.hit`): a `CatchStop` for GDB (a console
  message, a system-call stop, "the library list changed", a register view, a new process
  scope), or None to go on (it may have moved its hooks meanwhile: an exec catch follows the new
  program to its first instruction).
- A driver-side catchpoint (`DriverCatch`) is served by the hypervisor (e.g. Xen's MSR-write
  and exec-written events), one per `CatchKind` the driver declares: `monitor catch KIND ...`
  arms it through the driver, and the driver reports it as a `DriverStop` whose `catch` names
  the kind and whose `message` says what happened, which becomes a stop like any other.

Every catchpoint's stop reaches GDB as `StopReason.CATCH`.

`CatchpointTable` owns them all: it places and releases their hooks among vmigdb's own breakpoints
(`BreakpointTable.add_internal`, one owner name per hook), routes hits to the catchpoint that owns
the hook, and re-arms the ones that follow the process scope when the guest is resumed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.breakpoints import BreakpointTable
from vmigdb.debugger.events import SyscallStop
from vmigdb.debugger.model import ProcessScope, RegisterView, cr3_base

log = logging.getLogger("vmigdb.debugger")

OWNER_PREFIX = "catch:"  # owner names of hooks among vmigdb's own breakpoints


@dataclass(frozen=True, slots=True)
class HitFilter:
    """Which hits of a hook matter, decided from the hitting vCPU's registers alone.

    :ivar cr3: The page-table base (CR3 without PCID/PTI bits) the vCPU must be running with:
        one process.
    :ivar rsp: The stack pointer it must have: one thread at one depth.
    """

    cr3: int | None = None
    rsp: int | None = None

    def accepts(self, regs: RegisterFile) -> bool:
        if self.cr3 is not None and cr3_base(regs["cr3"]) != cr3_base(self.cr3):
            return False
        return self.rsp is None or regs["rsp"] == self.rsp


@dataclass(frozen=True, slots=True)
class Hook:
    address: int
    filter: HitFilter
    tag: str  # what the catchpoint calls it ("entry", "return"...)
    owner: str  # the owner name among vmigdb's own breakpoints (unique per hook)


@dataclass(frozen=True, slots=True)
class CatchStop:
    """A catchpoint's stop, as the catchpoint wants GDB to see it."""

    message: str | None = None
    syscall: SyscallStop | None = None
    libraries_changed: bool = False  # GDB should read the library list again (`library:`)
    libraries_only: bool = False  # and that is all: no stop of its own for GDB to show
    view: RegisterView | None = None
    orig_rax: int | None = None  # at a stop with the vCPU's own registers
    scope: ProcessScope | None = None  # the new process scope, when `set_scope`
    set_scope: bool = False


@dataclass(frozen=True, slots=True)
class Hit:
    """A vCPU stopped at one of a catchpoint's hooks, the hook's filter having accepted it."""

    cpu: int
    regs: RegisterFile
    hook: Hook


class Catchpoint(ABC):
    """One kind of catchpoint. See the module docstring."""

    kind: str

    def __init__(self) -> None:
        self.hooks: HookSet | None = None  # given by the table when added

    @property
    @abstractmethod
    def armed(self) -> bool: ...

    @abstractmethod
    def status(self) -> str:
        """One line for `monitor catch`."""

    def hit(self, hit: Hit) -> CatchStop | None:
        """At an accepted hit of one of this catchpoint's hooks: the stop, or None to go on."""
        return None

    def resuming(self, scope: ProcessScope | None) -> None:
        """The guest is about to run with `scope` in force: re-aim hooks that follow it (most
        catchpoints do not follow the scope)."""
        return None

    def clear(self) -> None:
        """Disarm: drop every hook (at detach, or when the user turns it off)."""
        if self.hooks is not None:
            self.hooks.clear()


class HookSet:
    """One catchpoint's hooks: placed among vmigdb's own breakpoints, each with its filter."""

    def __init__(self, table: CatchpointTable, catchpoint: Catchpoint) -> None:
        self._table = table
        self._catchpoint = catchpoint
        self.hooks: list[Hook] = []

    def add(self, address: int, filter: HitFilter, tag: str) -> Hook:
        """Place a hook. :raises BreakpointLimitError, DriverError: as `add_internal`"""
        owner = f"{OWNER_PREFIX}{self._catchpoint.kind}:{next(self._table.serial)}"
        hook = Hook(address, filter, tag, owner)
        self._table.breakpoints.add_internal(address, owner)
        self.hooks.append(hook)
        self._table.index(hook, self._catchpoint)
        return hook

    def remove(self, predicate: Callable[[Hook], bool]) -> None:
        keep = []
        for hook in self.hooks:
            if predicate(hook):
                self._table.breakpoints.release_internal(hook.owner)
                self._table.unindex(hook)
            else:
                keep.append(hook)
        self.hooks = keep

    def clear(self) -> None:
        self.remove(lambda _: True)


class CatchpointTable:
    """Every catchpoint of the session, by kind. See the module docstring."""

    def __init__(self, breakpoints: BreakpointTable) -> None:
        self.breakpoints = breakpoints
        self.serial = count(1)
        self._kinds: dict[str, Catchpoint] = {}
        self._by_address: dict[int, list[tuple[Hook, Catchpoint]]] = {}

    def add(self, catchpoint: Catchpoint) -> Catchpoint:
        self._kinds[catchpoint.kind] = catchpoint
        catchpoint.hooks = HookSet(self, catchpoint)
        return catchpoint

    def get(self, kind: str) -> Catchpoint | None:
        return self._kinds.get(kind)

    def kinds(self) -> list[Catchpoint]:
        return list(self._kinds.values())

    def index(self, hook: Hook, catchpoint: Catchpoint) -> None:
        self._by_address.setdefault(hook.address, []).append((hook, catchpoint))

    def unindex(self, hook: Hook) -> None:
        entries = [e for e in self._by_address.get(hook.address, []) if e[0] is not hook]
        if entries:
            self._by_address[hook.address] = entries
        else:
            self._by_address.pop(hook.address, None)

    def hooks(self) -> list[Hook]:
        """Every hook in place (for a hypervisor that filters hits itself)."""
        return [hook for entries in self._by_address.values() for hook, _ in entries]

    def at(self, address: int) -> bool:
        return address in self._by_address

    def hit(self, cpu: int, regs: RegisterFile) -> CatchStop | None:
        """A vCPU stopped at rip: the first catchpoint whose hook there accepts it and wants a
        stop, or None (no hook here, or none wants one: the guest goes on)."""
        for hook, catchpoint in list(self._by_address.get(regs["rip"], ())):
            if not hook.filter.accepts(regs):
                continue
            stop = catchpoint.hit(Hit(cpu, regs, hook))
            if stop is not None:
                return stop
        return None

    def resuming(self, scope: ProcessScope | None) -> None:
        for catchpoint in self._kinds.values():
            catchpoint.resuming(scope)

    def clear(self) -> None:
        for catchpoint in self._kinds.values():
            catchpoint.clear()
