"""The debugging model: a stopped or running machine of vCPUs, its registers, memory and breakpoints.

It knows nothing of the wire format. The session asks it for registers and memory while the machine is
stopped, hands it resume requests, and receives `StopEvent`s. Between a resume and the stop GDB sees,
the engine may run the guest several times on its own (a step QEMU lost is stepped again); such stops
never reach GDB.

Theory of operation:
- stopped: registers are read once per vCPU per stop and cached; virtual addresses are translated
  with vmigdb's own page walk over guest-physical memory, translations cached until the guest runs.
- resume(actions): stale breakpoints are dropped from the hypervisor, caches are dropped, the driver
  runs the vCPUs. `running` is True until `poll()` or `halt()` returns a StopEvent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from vmigdb.arch.x86_64.paging import (
    Fault,
    PagingMode,
    PhysicalMemoryError,
    Translation,
    Translator,
    paging_mode,
    translate_range,
)
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.breakpoints import (
    Breakpoint,
    BreakpointLimitError,
    BreakpointTable,
    Condition,
)
from vmigdb.debugger.events import SIGINT, SIGTRAP, StopEvent, StopReason
from vmigdb.debugger.guest_view import GuestView
from vmigdb.debugger.range_step import RangePlan, plan_range
from vmigdb.debugger.stepping import may_stay_put
from vmigdb.hv.base import BreakpointType, Driver, DriverError, DriverStop

log = logging.getLogger("vmigdb.debugger")

PAGE = 0x1000
_MAX_LOST_STEP_RETRIES = 3


class MemoryFault(Exception):
    """Not one byte at `address` could be read or written."""

    def __init__(self, address: int, why: str) -> None:
        super().__init__(f"cannot access memory at {address:#x}: {why}")
        self.address = address


class Debugger:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.breakpoints = BreakpointTable(driver)
        self.translator = Translator(driver.read_physical)
        self.physical_addresses = False  # `monitor phys on`: GDB's addresses are guest-physical
        self.guest = GuestView(driver)  # OS awareness, attached on first use
        self.scope: ProcessScope | None = None  # `monitor process`: one process's address space
        self.running = False
        self.last_stop: StopEvent | None = None
        self._cpus = driver.cpus()
        self._regs: dict[int, RegisterFile] = {}
        self._request: dict[int, Action] = {}  # what GDB asked for at the last resume
        self._driving: dict[int, str] = {}  # what the driver was last asked to do
        self._range: ActiveRange | None = None
        self._rips_at_resume: dict[int, int] = {}
        self._changes_seen = 0
        self._bp_changed_before_resume = False
        self._lost_step_retries = 0

    # -- machine ----------------------------------------------------------------------------------

    def cpus(self) -> list[int]:
        return list(self._cpus)

    def registers(self, cpu: int) -> RegisterFile:
        regs = self._regs.get(cpu)
        if regs is None:
            regs = self._regs[cpu] = self.driver.read_registers(cpu)
        return regs

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        self.driver.write_register(cpu, regnum, value)
        self._regs.pop(cpu, None)
        self.translator.flush()  # cr3/cr4/efer may have changed

    # -- memory -----------------------------------------------------------------------------------

    def _space(self, cpu: int) -> tuple[int, PagingMode]:
        """The page tables GDB's addresses go through: the scoped process's, else the vCPU's."""
        regs = self.registers(cpu)
        cr3 = self.scope.cr3 if self.scope is not None else regs["cr3"]
        return cr3, paging_mode(regs["cr0"], regs["cr4"], regs["efer"])

    def translate(self, cpu: int, addr: int) -> Translation | Fault:
        cr3, mode = self._space(cpu)
        return self.translator.translate(cr3, addr, mode)

    def read_memory(self, cpu: int, addr: int, length: int) -> bytes:
        """Read up to `length` bytes; stops at the first unreadable byte (GDB's `m` semantics)."""
        if self.physical_addresses:
            data = self._read_physical_partial(addr, length)
        else:
            cr3, mode = self._space(cpu)
            data = self.translator.read_virtual(cr3, addr, length, mode)
        if length and not data:
            raise MemoryFault(addr, "not mapped" if not self.physical_addresses else "not RAM")
        return data

    def _read_physical_partial(self, pa: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            chunk = min(length - len(out), PAGE - ((pa + len(out)) & (PAGE - 1)))
            try:
                out += self.driver.read_physical(pa + len(out), chunk)
            except PhysicalMemoryError:
                break
        return bytes(out)

    def dump_memory(self, cpu: int, addr: int, length: int, out: BinaryIO) -> int:
        """Write [addr, addr+length) to `out`, unmapped bytes as zeros; returns how many were unmapped.

        Virtual (or physical with `phys on`) chunks are translated once per contiguous run and
        copied straight from guest RAM: no packet, no hex.
        """
        if self.physical_addresses:
            chunks = [(addr, addr, length)]
        else:
            cr3, mode = self._space(cpu)
            chunks = translate_range(self.driver.read_physical, cr3, addr, length, mode)
        unmapped = 0
        for _va, pa, size in chunks:
            if pa is not None:
                done = 0
                while done < size:
                    step = min(size - done, 1 << 24)
                    try:
                        out.write(self.driver.read_physical(pa + done, step))
                    except PhysicalMemoryError:
                        data = self._read_physical_partial(pa + done, step)
                        out.write(data + bytes(step - len(data)))
                        unmapped += step - len(data)
                    done += step
            else:
                out.write(bytes(size))
                unmapped += size
        return unmapped

    def write_memory(self, cpu: int, addr: int, data: bytes) -> None:
        """Write through the hypervisor, page by page; all or nothing per page."""
        done = 0
        while done < len(data):
            va = addr + done
            chunk = min(len(data) - done, PAGE - (va & (PAGE - 1)))
            if self.physical_addresses:
                pa = va
            else:
                where = self.translate(cpu, va)
                if isinstance(where, Fault):
                    raise MemoryFault(va, where.reason)
                pa = where.pa
            self.driver.write_physical(pa, data[done : done + chunk])
            done += chunk
        self.translator.flush()  # the write may have been to a page table

    # -- breakpoints ------------------------------------------------------------------------------

    def add_breakpoint(
        self, type: BreakpointType, addr: int, kind: int, conditions: tuple[Condition, ...] = ()
    ) -> None:
        """`conditions`: target-side conditions; a hit is reported when any is non-zero. While a
        process is in scope, a new breakpoint fires only in that process."""
        scope = self.scope.cr3 if self.scope is not None and not type.is_watchpoint else None
        self.breakpoints.add(Breakpoint(type, addr, kind, conditions, scope))

    # -- process scope ----------------------------------------------------------------------------

    def set_scope(self, scope: ProcessScope | None) -> None:
        """Debug one process's address space (None: the whole machine again).

        Its exit is watched with a breakpoint of vmigdb's own on the kernel's exit path, which
        counts only in the process's address space.
        """
        self.breakpoints.release_internal("scope")
        self.scope = scope
        self.translator.flush()
        if scope is not None and scope.exit_hook is not None:
            self.breakpoints.add_internal(scope.exit_hook, "scope")

    def remove_breakpoint(self, type: BreakpointType, addr: int, kind: int) -> None:
        self.breakpoints.remove(Breakpoint(type, addr, kind))

    # -- run control ------------------------------------------------------------------------------

    def resume(self, actions: dict[int, Action]) -> None:
        """Run: `actions` maps vCPU to 'c', 's' or a `RangeStep`; vCPUs not named stay stopped."""
        if self.running:
            raise DriverError("the machine is already running")
        self._range = None
        for cpu, action in actions.items():
            if isinstance(action, RangeStep):
                self._range = self._start_range(cpu, action)
        self.breakpoints.sync()
        self._request = dict(actions)
        self._drive({cpu: "c" if act == "c" else "s" for cpu, act in actions.items()})

    def _drive(self, actions: dict[int, str], *, retry: bool = False) -> None:
        """Ask the driver to run; remembers what was asked, for the step checks at the stop."""
        if not retry:
            self._bp_changed_before_resume = self.breakpoints.changes != self._changes_seen
            self._changes_seen = self.breakpoints.changes
            self._lost_step_retries = 0
            self._rips_at_resume = {
                cpu: self.registers(cpu)["rip"] for cpu, act in actions.items() if act == "s"
            }
        self._driving = dict(actions)
        self._run()

    def _run(self) -> None:
        self._regs.clear()
        self.translator.flush()
        self.guest.ran()
        self.driver.resume(self._driving)
        self.running = True

    def interrupt(self) -> None:
        if self.running:
            self.driver.interrupt()

    def poll(self) -> StopEvent | None:
        """Call when the driver's stop fd is readable. None: nothing for GDB (yet)."""
        stop = self.driver.poll_stop()
        return None if stop is None else self._handle(stop)

    def halt(self, timeout: float = 10.0) -> StopEvent:
        """Stop a running machine now (at attach). Returns the stop, whatever caused it."""
        if not self.running:
            assert self.last_stop is not None
            return self.last_stop
        self.driver.interrupt()
        while True:
            event = self._handle(self.driver.wait_stop(timeout))
            if event is not None:
                return event

    def detach(self) -> None:
        """Remove every breakpoint and let the whole machine run."""
        self.breakpoints.clear()
        if not self.running:
            self.resume({cpu: "c" for cpu in self._cpus})

    # -- stops ------------------------------------------------------------------------------------

    def _handle(self, stop: DriverStop) -> StopEvent | None:
        """Interpret one hypervisor stop: report it to GDB, or go on by ourselves (None)."""
        self.running = False
        self._regs.clear()
        self.translator.flush()
        if stop.exited is not None:
            return self._report(StopEvent(StopReason.EXITED, None, stop.signal, None, stop.exited))
        cpu = stop.cpu if stop.cpu in self._cpus else self._cpus[0]
        regs = self.registers(cpu)
        if stop.watch is not None:
            return self._report(StopEvent(StopReason.WATCH, cpu, SIGTRAP, stop.watch, None, regs))
        if stop.signal == SIGINT:
            return self._report(StopEvent(StopReason.INTERRUPT, cpu, SIGINT, None, None, regs))
        if self._driving.get(cpu) == "s" and stop.signal == SIGTRAP:
            if self._lost_step(cpu, regs["rip"]):
                return None
            if self._request.get(cpu) == "s":
                return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
            return self._after_own_step(cpu, regs)
        return self._on_trap(cpu, regs, stop.signal or SIGTRAP)

    def _after_own_step(self, cpu: int, regs: RegisterFile) -> StopEvent | None:
        """A step vmigdb took by itself (range stepping, or stepping off a filtered hit)."""
        rip = regs["rip"]
        rng = self._range if self._range is not None and self._range.cpu == cpu else None
        if rng is not None and not rng.contains(rip):
            return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
        if self.breakpoints.at(rip):  # execution reached a GDB breakpoint
            event = self._breakpoint_hit(cpu, regs)
            if event is not None:
                return event
        if rng is not None and (rng.plan is None or rip in rng.plan.step_points):
            self._drive(self._with(cpu, "s"))
        elif self.breakpoints.installed_at(rip):
            self._drive({cpu: "s"})  # continuing from a breakpoint would hit it again at once
        else:
            self._drive(self._with(cpu, "c"))
        return None

    def _on_trap(self, cpu: int, regs: RegisterFile, signal: int) -> StopEvent | None:
        """A vCPU that was running stopped on a trap: a breakpoint, ours, or unexplained."""
        rip = regs["rip"]
        rng = self._range
        if self.breakpoints.at(rip):
            event = self._breakpoint_hit(cpu, regs)
            if event is not None:
                return event
        elif self._scoped_process_exits(rip, regs):
            scope = self.scope
            assert scope is not None
            self.set_scope(None)
            message = (
                f"vmigdb: process {scope.pid} ({scope.comm}) is exiting; "
                "the scope is the whole machine again"
            )
            event = StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, regs, message)
            return self._report(event)
        elif self.breakpoints.internal_at(rip, "range") and rng is not None and rng.owns(cpu, regs):
            if not rng.contains(rip):
                return self._report(StopEvent(StopReason.STEP, cpu, SIGTRAP, None, None, regs))
            self._drive(self._with(cpu, "s"))  # an instruction whose destination only a step tells
            return None
        elif not self.breakpoints.internal_at(rip):
            return self._report(StopEvent(StopReason.SIGNAL, cpu, signal, None, None, regs))
        self._drive({cpu: "s"})  # not for GDB: step off it, then go on as GDB asked
        return None

    def _with(self, cpu: int, action: str) -> dict[int, str]:
        """GDB's requested actions as driver actions, with `cpu` doing `action`."""
        actions = {c: "s" if a == "s" else "c" for c, a in self._request.items()}
        actions[cpu] = action
        return actions

    def _scoped_process_exits(self, rip: int, regs: RegisterFile) -> bool:
        scope = self.scope
        return (
            scope is not None
            and rip == scope.exit_hook
            and cr3_base(regs["cr3"]) == cr3_base(scope.cr3)
            and (scope.is_exiting is None or scope.is_exiting(regs))
        )

    def _breakpoint_hit(self, cpu: int, regs: RegisterFile) -> StopEvent | None:
        """GDB breakpoints at rip: report unless each is out of scope or has only false conditions.

        The scope check (CR3 base) happens here, inside vmigdb: a hit in another process resumes
        the guest without a GDB round trip.
        """
        space = cr3_base(regs["cr3"])
        hits = [
            bp
            for bp in self.breakpoints.at(regs["rip"])
            if bp.scope_cr3 is None or cr3_base(bp.scope_cr3) == space
        ]
        if not any(self._condition_holds(bp, cpu, regs) for bp in hits):
            return None
        software = any(bp.type == BreakpointType.SOFTWARE for bp in hits)
        reason = StopReason.SW_BREAK if software else StopReason.HW_BREAK
        return self._report(StopEvent(reason, cpu, SIGTRAP, None, None, regs))

    def _condition_holds(self, bp: Breakpoint, cpu: int, regs: RegisterFile) -> bool:
        if not bp.conditions:
            return True
        context = ConditionContext(self, cpu, regs)
        for condition in bp.conditions:
            try:
                if condition(context):
                    return True
            except Exception as exc:  # noqa: BLE001 - cannot tell: report, GDB evaluates it again
                log.info("condition at %#x could not be evaluated (%s); stopping", bp.addr, exc)
                return True
        return False

    def _report(self, event: StopEvent) -> StopEvent:
        if self._range is not None:
            self.breakpoints.release_internal("range")
            self._range = None
        self._request = {}
        self.last_stop = event
        return event

    # -- range stepping ---------------------------------------------------------------------------

    def _start_range(self, cpu: int, step: RangeStep) -> ActiveRange:
        """Plan a range step and place its exit breakpoints; without a plan, every step is taken."""
        regs = self.registers(cpu)
        plan = None
        try:
            code = self.read_memory(cpu, step.start, step.end - step.start)
            plan = plan_range(code, step.start, step.end)
            if plan is not None:
                for address in plan.exits | plan.step_points:
                    self.breakpoints.add_internal(address, "range")
        except (MemoryFault, BreakpointLimitError, DriverError) as exc:
            log.info("range %#x-%#x: stepping each instruction (%s)", step.start, step.end, exc)
            self.breakpoints.release_internal("range")
            plan = None
        return ActiveRange(cpu, step.start, step.end, plan, cr3_base(regs["cr3"]))

    def _lost_step(self, cpu: int, rip: int) -> bool:
        """QEMU reported a step that did not move right after a breakpoint change: step again."""
        if (
            rip != self._rips_at_resume.get(cpu)
            or not self._bp_changed_before_resume
            or self._lost_step_retries >= _MAX_LOST_STEP_RETRIES
        ):
            return False
        try:
            code = self.read_memory(cpu, rip, 16)
        except MemoryFault:
            return False
        if may_stay_put(code, rip):
            return False
        self._lost_step_retries += 1
        log.info("QEMU lost a single-step at %#x on CPU#%d; stepping again", rip, cpu - 1)
        self._drive(self._driving, retry=True)
        return True


def cr3_base(cr3: int) -> int:
    """The page-table base in CR3, without PCID bits and the PTI user/kernel bit (bit 12)."""
    return cr3 & 0x000F_FFFF_FFFF_E000


@dataclass(frozen=True, slots=True)
class ProcessScope:
    """One guest process as the debugging scope."""

    pid: int
    comm: str
    cr3: int  # physical address of its page tables (what CR3 holds, without PCID/PTI bits)
    exit_hook: int | None = None  # kernel address of the exit path (e.g. do_exit)
    # Given the registers at the exit hook: is it this process (not just one of its threads)?
    is_exiting: Callable[[RegisterFile], bool] | None = None


@dataclass(frozen=True, slots=True)
class RangeStep:
    """GDB's vCont;rSTART,END: keep stepping while START <= rip < END."""

    start: int
    end: int


Action = str | RangeStep  # 'c', 's' or a range step


@dataclass(frozen=True, slots=True)
class ActiveRange:
    cpu: int
    start: int
    end: int
    plan: RangePlan | None  # None: no plan, every instruction is stepped
    cr3: int  # exit breakpoints count only in this address space

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end

    def owns(self, cpu: int, regs: RegisterFile) -> bool:
        return cpu == self.cpu and cr3_base(regs["cr3"]) == self.cr3


class ConditionContext:
    """What a target-side condition may read: the hitting vCPU's registers and memory."""

    def __init__(self, debugger: Debugger, cpu: int, regs: RegisterFile) -> None:
        self._debugger = debugger
        self._cpu = cpu
        self._regs = regs

    def register(self, regnum: int) -> int:
        return int.from_bytes(self._regs.raw(regnum), "little")

    def read_memory(self, address: int, size: int) -> bytes:
        data = self._debugger.read_memory(self._cpu, address, size)
        if len(data) != size:
            raise MemoryFault(address + len(data), "not mapped")
        return data
