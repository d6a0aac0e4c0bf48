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

from vmigdb.arch.x86_64.paging import (
    Fault,
    PagingMode,
    PhysicalMemoryError,
    Translation,
    Translator,
    paging_mode,
)
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.breakpoints import Breakpoint, BreakpointTable
from vmigdb.debugger.events import SIGINT, SIGTRAP, StopEvent, StopReason
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
        self.running = False
        self.last_stop: StopEvent | None = None
        self._cpus = driver.cpus()
        self._regs: dict[int, RegisterFile] = {}
        self._actions: dict[int, str] = {}
        self._rips_at_resume: dict[int, int] = {}
        self._changes_at_stop = 0
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
        regs = self.registers(cpu)
        return regs["cr3"], paging_mode(regs["cr0"], regs["cr4"], regs["efer"])

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

    def add_breakpoint(self, type: BreakpointType, addr: int, kind: int) -> None:
        self.breakpoints.add(Breakpoint(type, addr, kind))

    def remove_breakpoint(self, type: BreakpointType, addr: int, kind: int) -> None:
        self.breakpoints.remove(Breakpoint(type, addr, kind))

    # -- run control ------------------------------------------------------------------------------

    def resume(self, actions: dict[int, str]) -> None:
        """Run: `actions` maps vCPU to 'c' or 's'; vCPUs not named stay stopped."""
        if self.running:
            raise DriverError("the machine is already running")
        self.breakpoints.sync()
        self._bp_changed_before_resume = self.breakpoints.changes != self._changes_at_stop
        self._actions = dict(actions)
        self._rips_at_resume = {
            cpu: self.registers(cpu)["rip"] for cpu, act in actions.items() if act == "s"
        }
        self._lost_step_retries = 0
        self._run()

    def _run(self) -> None:
        self._regs.clear()
        self.translator.flush()
        self.driver.resume(self._actions)
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
        self.running = False
        self._regs.clear()
        self.translator.flush()
        if stop.exited is not None:
            event = StopEvent(StopReason.EXITED, None, signal=stop.signal, exit_code=stop.exited)
            self.last_stop = event
            return event
        cpu = stop.cpu if stop.cpu in self._cpus else self._cpus[0]
        regs = self.registers(cpu)
        rip = regs["rip"]
        if stop.watch is not None:
            reason = StopReason.WATCH
        elif stop.signal == SIGINT:
            reason = StopReason.INTERRUPT
        elif self._actions.get(cpu) == "s":
            if self._lost_step(cpu, rip):
                return None
            reason = StopReason.STEP
        else:
            types = {bp.type for bp in self.breakpoints.at(rip)}
            if BreakpointType.SOFTWARE in types:
                reason = StopReason.SW_BREAK
            elif BreakpointType.HARDWARE in types:
                reason = StopReason.HW_BREAK
            else:
                reason = StopReason.SIGNAL
        signal = SIGINT if reason is StopReason.INTERRUPT else (stop.signal or SIGTRAP)
        event = StopEvent(reason, cpu, signal=signal, watch=stop.watch, registers=regs)
        self._changes_at_stop = self.breakpoints.changes
        self.last_stop = event
        return event

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
        self._run()
        return True
