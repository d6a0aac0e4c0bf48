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
from vmigdb.arch.x86_64.validate import check_register_write
from vmigdb.debugger.breakpoints import (
    Breakpoint,
    BreakpointTable,
    Condition,
)
from vmigdb.debugger.events import SIGTRAP, StopEvent, StopReason
from vmigdb.debugger.guest_view import GuestView
from vmigdb.debugger.health import HealthWatch
from vmigdb.debugger.model import (
    Action,
    ActiveRange,
    MemoryFault,
    ProcessScope,
    RangeStep,
    RegisterWriteRefused,
    cr3_base,
)
from vmigdb.debugger.policy import StealthMode, StealthPolicy
from vmigdb.debugger.stops import StopHandling
from vmigdb.hv.base import BreakpointType, Driver, DriverError, MachineGone

log = logging.getLogger("vmigdb.debugger")

PAGE = 0x1000

__all__ = ["Action", "Debugger", "MemoryFault", "ProcessScope", "RangeStep", "cr3_base"]


class Debugger(StopHandling):
    def __init__(self, driver: Driver, stealth: StealthMode = StealthMode.DEFAULT) -> None:
        self.driver = driver
        self.policy = StealthPolicy(stealth, driver.capabilities)
        self.breakpoints = BreakpointTable(driver, self.policy)
        self.translator = Translator(driver.read_physical)
        self.physical_addresses = False  # `monitor phys on`: GDB's addresses are guest-physical
        self.guest = GuestView(driver)  # OS awareness, attached on first use
        self.health = HealthWatch(self.breakpoints, self.guest)  # monitor catch panic
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
        self._interrupt_requested = False  # GDB's ^C: the next stop is reported, whatever it is

    # -- machine ----------------------------------------------------------------------------------

    def cpus(self) -> list[int]:
        return list(self._cpus)

    def registers(self, cpu: int) -> RegisterFile:
        regs = self._regs.get(cpu)
        if regs is None:
            regs = self._regs[cpu] = self.driver.read_registers(cpu)
            self.policy.record("registers", self.driver.capabilities.registers)
        return regs

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        """Write one register, unless no vCPU could hold the value (RegisterWriteRefused)."""
        self.write_registers(cpu, {regnum: value})

    def write_registers(self, cpu: int, values: dict[int, bytes]) -> None:
        """Write several registers: all are checked first, so a refusal writes none of them."""
        current = self.registers(cpu)
        for regnum, value in values.items():
            reason = check_register_write(regnum, value, current)
            if reason is not None:
                raise RegisterWriteRefused(f"refused: {reason}")
        for regnum, value in values.items():
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
        self.policy.record("memory read", self.driver.capabilities.memory_read)
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
        self.policy.record("memory read", self.driver.capabilities.memory_read)
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
        self.policy.record("memory write", self.driver.capabilities.memory_write)
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
        if any(action != "c" for action in actions.values()):
            self._use_single_step()
        self._range = None
        for cpu, action in actions.items():
            if isinstance(action, RangeStep):
                self._range = self._start_range(cpu, action)
        self.breakpoints.sync()
        self._request = dict(actions)
        self._drive({cpu: self._first_move(cpu, act) for cpu, act in actions.items()})

    def _first_move(self, cpu: int, action: Action) -> str:
        """A planned range step starts running at once, unless its first instruction holds a
        breakpoint or only a step can tell where it goes: one VM stop fewer per `next`, and no
        single-step right after the breakpoint changes the plan made (QEMU 7.2 handles those
        badly: see `_lost_step`)."""
        if action == "c":
            # A vCPU stopped on a breakpoint of vmigdb's own (a death hook) steps off it first:
            # continuing would hit it again at once.
            # Only a vCPU whose registers this stop has read can be standing on one.
            regs = self._regs.get(cpu)
            if regs is not None and self.breakpoints.internal_at(regs["rip"]):
                return "s"
            return "c"
        rng = self._range
        if isinstance(action, RangeStep) and rng is not None and rng.cpu == cpu and rng.plan:
            rip = self.registers(cpu)["rip"]
            if rip not in rng.plan.step_points and not self.breakpoints.installed_at(rip):
                return "c"
        return "s"

    def _use_single_step(self) -> None:
        """Ask the stealth policy before any step (raises StealthRefused in strict mode)."""
        mechanism = self.driver.capabilities.single_step
        if mechanism is None:
            raise DriverError(f"the {self.driver.name} driver cannot single-step")
        self.policy.use("single-step", mechanism)

    def _drive(self, actions: dict[int, str], *, retry: bool = False) -> None:
        """Ask the driver to run; remembers what was asked, for the step checks at the stop."""
        if "s" in actions.values():
            self._use_single_step()  # vmigdb's own steps (step-over, range stepping) count too
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
            self._interrupt_requested = True
            self.driver.interrupt()

    def poll(self) -> StopEvent | None:
        """Call when the driver's stop fd is readable. None: nothing for GDB (yet)."""
        try:
            stop = self.driver.poll_stop()
        except MachineGone:
            raise
        except DriverError as exc:
            # The hypervisor did not run as asked (e.g. refused the resume): the machine is
            # stopped, and GDB, waiting for a stop, is told so with the reason.
            log.warning("%s", exc)
            self.running = False
            cpu = self._cpus[0]
            message = f"vmigdb: the guest did not run as asked: {exc}"
            return self._report(
                StopEvent(StopReason.SIGNAL, cpu, SIGTRAP, None, None, self.registers(cpu), message)
            )
        return None if stop is None else self._handle(stop)

    def halt(self, timeout: float = 10.0) -> StopEvent:
        """Stop a running machine now (at attach). Returns the stop, whatever caused it."""
        if not self.running:
            assert self.last_stop is not None
            return self.last_stop
        self.interrupt()
        while True:
            event = self._handle(self.driver.wait_stop(timeout))
            if event is not None:
                return event

    def client_attached(self) -> None:
        """A GDB client has taken the (stopped) machine: re-check the guest, arm the health watch."""
        self.guest.revalidate()
        self.health.arm()

    def detach(self) -> None:
        """Remove every breakpoint (GDB's and vmigdb's own), drop the process scope, and let the
        whole machine run: a detached guest carries nothing of the debugger."""
        self.health.disarm()
        self.set_scope(None)
        self.breakpoints.clear()
        self.breakpoints.release_internal("range")
        if not self.running:
            self.resume({cpu: "c" for cpu in self._cpus})
