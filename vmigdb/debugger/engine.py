"""The debugging model: a stopped or running machine of vCPUs, its registers, memory and breakpoints.

It knows nothing of the wire format. The session asks it for registers and memory while the machine is
stopped, hands it resume requests, and receives `StopEvent`s. Between a resume and the stop GDB sees,
the engine may run the guest several times on its own (a step QEMU lost is stepped again); such stops
never reach GDB.

`Debugger` is the face the session and the monitor use. Each piece of state has one owner behind it:
- `MachineState` (state.py): registers cached per stop, memory through vmigdb's page walk, the
  address mode (`monitor phys`);
- `BreakpointTable` (breakpoints.py): what GDB wants, what the hypervisor holds, vmigdb's own;
- `ScopeWatch` (scope.py): the process in scope and the watch on its exit;
- `RunControl` (stops.py): running or stopped, the last stop, what GDB and vmigdb asked the
  hypervisor to do, the range step in flight;
- `StealthPolicy` (policy.py): which mechanisms may be used, and which were;
- `GuestView` (guest_view.py): OS awareness, attached on first use;
- `CatchpointTable` (catchpoints.py): catchpoints of every kind (panic, syscall, exec, module, and
  the driver's own), their hooks and their stops; `LibraryList` (libraries.py): what GDB lists
  as shared libraries for the scope.
"""

from __future__ import annotations

from typing import BinaryIO

from vmigdb.arch.x86_64.pagemap import Leaf, leaves
from vmigdb.arch.x86_64.paging import Fault, PagingMode, Translation, Translator, paging_mode
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.breakpoints import Breakpoint, BreakpointTable, Condition
from vmigdb.debugger.catch_exec import ExecCatch
from vmigdb.debugger.catch_libraries import LibraryWatch
from vmigdb.debugger.catch_module import ModuleCatch
from vmigdb.debugger.catch_syscall import SyscallCatch
from vmigdb.debugger.catchpoints import CatchpointTable
from vmigdb.debugger.driver_catch import DriverCatch
from vmigdb.debugger.events import StopEvent
from vmigdb.debugger.guest_view import GuestView
from vmigdb.debugger.health import HealthWatch
from vmigdb.debugger.libraries import LibraryList
from vmigdb.debugger.model import Action, MemoryFault, ProcessScope, RangeStep, cr3_base
from vmigdb.debugger.policy import StealthMode, StealthPolicy
from vmigdb.debugger.scope import ScopeWatch
from vmigdb.debugger.snapshots import SnapshotControl
from vmigdb.debugger.state import MachineState
from vmigdb.debugger.stops import RunControl
from vmigdb.hv.base import BreakpointType, Driver

__all__ = ["Action", "Debugger", "MemoryFault", "ProcessScope", "RangeStep", "cr3_base"]


class Debugger:
    def __init__(self, driver: Driver, stealth: StealthMode = StealthMode.DEFAULT) -> None:
        self.driver = driver
        self.policy = StealthPolicy(stealth, driver.capabilities)
        self.breakpoints = BreakpointTable(driver, self.policy)
        self.guest = GuestView(driver)
        driver.address_spaces = self.guest.address_spaces
        self._scope = ScopeWatch(self.breakpoints, watch_exit=driver.capabilities.run_control)
        self.state = MachineState(driver, self.policy, self._scope, self._read_unmapped)
        self.catchpoints = CatchpointTable(self.breakpoints)
        self.health = HealthWatch(self.breakpoints, self.guest)  # monitor catch panic
        self.catchpoints.add(self.health)
        self.syscalls = SyscallCatch(self.guest)  # GDB's catch syscall (QCatchSyscalls)
        self.catchpoints.add(self.syscalls)
        self.exec_catch = ExecCatch(self.guest)  # monitor catch exec
        self.catchpoints.add(self.exec_catch)
        self.module_catch = ModuleCatch(self.guest, self._scope)  # monitor catch module
        self.catchpoints.add(self.module_catch)
        self.catchpoints.add(LibraryWatch(self.guest, self._scope))  # a scoped process's library loads
        for kind in driver.catchpoints():  # e.g. Xen's monitor catch msr-write
            self.catchpoints.add(DriverCatch(driver, kind))
        self.libraries = LibraryList(self.guest, self._scope)
        self._arm_health = False  # arm it at the next resume (a client attached)
        self.run_control = RunControl(
            driver,
            self.state,
            self.breakpoints,
            self.policy,
            self._scope,
            self.catchpoints,
            self.guest.ran,
        )
        self.snapshots = SnapshotControl(
            driver, self.state, self.guest, self._scope, self.run_control
        )

    # -- what the owners hold ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.run_control.running

    @property
    def last_stop(self) -> StopEvent | None:
        return self.run_control.last_stop

    @property
    def scope(self) -> ProcessScope | None:
        """`monitor process`: the process whose address space GDB debugs (None: all of them)."""
        return self._scope.current

    @property
    def physical_addresses(self) -> bool:
        """`monitor phys on`: GDB's addresses are guest-physical."""
        return self.state.physical_addresses

    @physical_addresses.setter
    def physical_addresses(self, value: bool) -> None:
        self.state.physical_addresses = value

    @property
    def translator(self) -> Translator:
        return self.state.translator

    # -- machine ----------------------------------------------------------------------------------

    def cpus(self) -> list[int]:
        return self.state.cpus()

    def registers(self, cpu: int) -> RegisterFile:
        """The registers GDB sees for `cpu`: the vCPU's, or a catchpoint's view of them (a system
        call's caller at its entry)."""
        return self.state.gdb_registers(cpu)

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        """Write one register, unless no vCPU could hold the value (RegisterWriteRefused)."""
        self.state.write_gdb_registers(cpu, {regnum: value})

    def write_registers(self, cpu: int, values: dict[int, bytes]) -> None:
        """Write several registers: all are checked first, so a refusal writes none of them."""
        self.state.write_gdb_registers(cpu, values)

    def orig_rax(self, cpu: int) -> int:
        """GDB's Linux ``orig_rax``: the system call's number at a system-call stop, else -1."""
        return self.state.orig_rax(cpu)

    def write_orig_rax(self, cpu: int, value: int) -> None:
        self.state.write_orig_rax(cpu, value)

    # -- memory -----------------------------------------------------------------------------------

    def _read_unmapped(self, pid: int, address: int, size: int) -> bytes:
        """The scoped process's memory its page tables do not map yet (see `GuestOS`)."""
        if not self.guest.available():
            return b""
        return self.guest.os().read_unmapped(pid, address, size)

    def translate(self, cpu: int, addr: int) -> Translation | Fault:
        return self.state.translate(cpu, addr)

    def mappings(self, cpu: int, cr3: int | None = None) -> tuple[PagingMode, list[Leaf]]:
        """Every present page of an address space, from its page tables: the one GDB's
        addresses go through (the scoped process's, else `cpu`'s), or the one rooted at `cr3`
        (in `cpu`'s paging mode)."""
        if cr3 is None:
            cr3, mode = self.state.space(cpu)
        else:
            regs = self.registers(cpu)
            mode = paging_mode(regs["cr0"], regs["cr4"], regs["efer"])
        self.policy.record("memory read", self.driver.capabilities.memory_read)
        return mode, list(leaves(self.driver.read_physical, cr3, mode))

    def read_memory(self, cpu: int, addr: int, length: int) -> bytes:
        """Read up to `length` bytes; stops at the first unreadable byte (GDB's `m` semantics)."""
        return self.state.read_memory(cpu, addr, length)

    def dump_memory(self, cpu: int, addr: int, length: int, out: BinaryIO) -> int:
        """Write [addr, addr+length) to `out`, unmapped bytes as zeros; returns how many were
        unmapped."""
        return self.state.dump_memory(cpu, addr, length, out)

    def write_memory(self, cpu: int, addr: int, data: bytes) -> None:
        """Write through the hypervisor, page by page; all or nothing per page."""
        self.state.write_memory(cpu, addr, data)

    # -- breakpoints ------------------------------------------------------------------------------

    def add_breakpoint(
        self, type: BreakpointType, addr: int, kind: int, conditions: tuple[Condition, ...] = ()
    ) -> None:
        """`conditions`: target-side conditions; a hit is reported when any is non-zero. While a
        process is in scope, a new breakpoint fires only in that process."""
        scope = None if type.is_watchpoint else self._scope.cr3
        self.breakpoints.add(Breakpoint(type, addr, kind, conditions, scope))

    def remove_breakpoint(self, type: BreakpointType, addr: int, kind: int) -> None:
        self.breakpoints.remove(Breakpoint(type, addr, kind))

    # -- process scope ----------------------------------------------------------------------------

    def set_scope(self, scope: ProcessScope | None) -> None:
        """Debug one process's address space (None: the whole machine again).

        Its exit is watched with a breakpoint of vmigdb's own on the kernel's exit path, which
        counts only in the process's address space.
        """
        self._scope.set(scope)

    # -- catchpoints ------------------------------------------------------------------------------

    def catch_syscalls(self, enabled: bool, numbers: frozenset[int] | None) -> None:
        """GDB's QCatchSyscalls: catch system calls `numbers` (None: all) of the scoped process,
        or of every process when none is in scope.

        :raises SyscallCatchError: if they cannot be caught (the message says why)
        """
        self.syscalls.configure(enabled, numbers, self._scope.current)

    # -- run control ------------------------------------------------------------------------------

    def resume(self, actions: dict[int, Action]) -> StopEvent | None:
        """Run: `actions` maps vCPU to 'c', 's' or a `RangeStep`; vCPUs not named stay stopped.
        Returns a stop instead of running when GDB has one to see first (a snapshot loaded)."""
        if self._arm_health and not self.running:
            self._arm_health = False
            self.health.arm()
        return self.run_control.resume(actions)

    def interrupt(self) -> None:
        self.run_control.interrupt()

    def poll(self) -> StopEvent | None:
        """Call when the driver's stop fd is readable. None: nothing for GDB (yet)."""
        return self.run_control.poll()

    def halt(self, timeout: float = 10.0) -> StopEvent:
        """Stop a running machine now (at attach). Returns the stop, whatever caused it."""
        return self.run_control.halt(timeout)

    def client_attached(self) -> None:
        """A GDB client has taken the (stopped) machine: re-check the guest. The health watch is
        armed when the guest is first resumed: analysing the guest here would delay the answer
        to GDB's first packet past its 2 s timeout on a loaded host."""
        self.guest.revalidate()
        self._arm_health = self.driver.capabilities.run_control

    def detach(self, *, run: bool = True) -> None:
        """Remove every breakpoint (GDB's and vmigdb's own), disarm the catchpoints, drop the process
        scope, and let the whole machine run (unless `run` is False: an attached VM goes back as it
        was found, which its driver sees to): a detached guest carries nothing of the debugger."""
        self._arm_health = False
        self.catchpoints.clear()
        self.set_scope(None)
        self.breakpoints.clear()
        self.run_control.forget_range()
        if run and not self.running and self.driver.capabilities.run_control:
            while self.resume({cpu: "c" for cpu in self.cpus()}) is not None:
                pass  # a stop GDB never saw (a snapshot loaded) is of no interest now
