"""The hypervisor driver interface: what the debugger may ask of a hypervisor, and how honestly it answers.

A driver is small. It declares what it can do and its mechanisms up front (`Capabilities`), each
mechanism with whether the guest could observe it, so the debugger can choose a mechanism per
request, the session can advertise and serve exactly what the driver can do, and `monitor stealth`
can say the truth. Everything else is plain verbs on a stopped machine, plus a file descriptor to
watch while the guest runs.

Only reading is required of every driver (`cpus`, `read_physical`, `read_registers`, `close`). The
rest is optional, and a driver without it is first-class: a memory dump has no run control and
writes nothing, and says so in its capabilities (`run_control=False`, `memory_write=None`,
`register_write=False`); the base class answers the verbs it does not override with `Unsupported`.

Theory of operation (all-stop), for a driver with `run_control`:
- While stopped, every call is synchronous and answered at once.
- `resume(actions)` starts the vCPUs named in `actions` ('c' continue, 's' step one instruction); vCPUs
  not named stay stopped. The call returns at once.
- While running, the owner watches `stop_fileno()`; when it is readable, `poll_stop()` returns a
  `DriverStop` (every vCPU is stopped again) or `None` (nothing complete yet). A driver whose
  hypervisor reports stops on a thread or event loop of its own (libvmi's `events_listen`) makes
  that readable itself, e.g. with a pipe it writes to when a stop is ready.
- `interrupt()` asks a running machine to stop; the stop arrives through `poll_stop()` like any other.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from vmigdb.arch.x86_64.registers import RegisterFile


class BreakpointType(enum.IntEnum):
    """GDB's Z-packet types."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCH = 2
    READ_WATCH = 3
    ACCESS_WATCH = 4

    @property
    def is_watchpoint(self) -> bool:
        return self >= BreakpointType.WRITE_WATCH


@dataclass(frozen=True, slots=True)
class Mechanism:
    """One way a driver does one job, and whether the guest could tell."""

    key: str
    description: str
    guest_visible: bool
    limit: int | None = None  # e.g. 4 hardware debug-register slots
    why: str = ""  # why it is (in)visible, shown by `monitor stealth`


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a driver can do, declared once: the mechanism for each debugger job (`None`: the job
    is unsupported), and whether it has run control and register writes at all.

    The session derives what it advertises and serves from this (`qSupported`, `vCont?`, which
    packets get an answer and which a refusal), and the debugger picks its mechanisms from it.
    """

    registers: Mechanism
    memory_read: Mechanism
    memory_write: Mechanism | None
    sw_breakpoint: Mechanism | None  # what serves GDB's Z0
    hw_breakpoint: Mechanism | None  # what serves GDB's Z1
    watchpoint: Mechanism | None  # Z2/Z3/Z4
    single_step: Mechanism | None
    # resume, interrupt and stops (`Driver.resume`...): False for a memory dump, which never runs
    run_control: bool
    register_write: bool  # `Driver.write_register`
    extra: tuple[Mechanism, ...] = field(default=())  # anything else the driver does to the VM
    # A visible way to serve Z0 once the invisible one is exhausted (e.g. 0xCC patched into RAM
    # under KVM after the 4 debug registers); used only if the stealth policy allows it.
    sw_breakpoint_fallback: Mechanism | None = None
    # What the guest's clocks show of the debugger's work (stops, retranslation): every job that
    # stops the guest or changes its code's translation is only as invisible as this.
    guest_time: Mechanism | None = None

    def __post_init__(self) -> None:
        stopping = ("sw_breakpoint", "hw_breakpoint", "watchpoint", "single_step")
        for job in (*stopping, "sw_breakpoint_fallback"):
            if not self.run_control and getattr(self, job) is not None:
                raise ValueError(
                    f"{job} needs run control: a machine that never runs stops nowhere"
                )

    def all(self) -> list[tuple[str, Mechanism]]:
        jobs = [
            ("registers", self.registers),
            ("memory read", self.memory_read),
            ("memory write", self.memory_write),
            ("software breakpoint", self.sw_breakpoint),
            ("hardware breakpoint", self.hw_breakpoint),
            ("watchpoint", self.watchpoint),
            ("single-step", self.single_step),
            ("software breakpoint (fallback)", self.sw_breakpoint_fallback),
            ("guest time", self.guest_time),
        ]
        jobs += [(m.key, m) for m in self.extra]
        return [(job, m) for job, m in jobs if m is not None]


@dataclass(frozen=True, slots=True)
class DriverStop:
    """A stop as the hypervisor reported it, before the debugger interprets it.

    `cpu` is the 1-based vCPU that stopped (None when the machine is gone). `signal` is the GDB signal
    number the hypervisor gave (5 trap, 2 interrupt). `watch` is set for a watchpoint hit. `exited` holds
    an exit status once the VM is gone; no further calls are valid then. `catch` names the driver
    catchpoint (`Driver.catchpoints`) that stopped the machine, and `message` says what happened
    (shown on GDB's console): such a stop is reported as it is, never filtered.
    """

    cpu: int | None
    signal: int
    watch: tuple[BreakpointType, int] | None = None
    exited: int | None = None
    catch: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class CatchKind:
    """A kind of guest event a driver can stop on by itself (`monitor catch NAME`), e.g. an MSR write
    intercepted by the hypervisor."""

    name: str
    help: str  # one line: what stops the machine
    scoped: bool = False  # takes a process (an address space) to watch, else the whole machine


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One saved state of the whole VM."""

    name: str
    vm_state_size: int  # bytes of VM state
    date: float  # host time of the save (seconds since the epoch)
    vm_clock: float  # the guest's clock at the save (seconds since it booted)


class SnapshotStore(ABC):
    """Optional driver feature (`Driver.snapshots`): whole-VM snapshots, for detonation loops.

    Every call is made while the machine is stopped and leaves it stopped; the calls are
    coroutines because they take seconds (a VM's RAM is written or read back). Each returns how
    long the hypervisor took, in seconds. :raises DriverError: with the reason.
    """

    @abstractmethod
    async def save(self, name: str) -> float: ...

    @abstractmethod
    async def load(self, name: str) -> float: ...

    @abstractmethod
    async def delete(self, name: str) -> float: ...

    @abstractmethod
    async def list(self) -> list[SnapshotInfo]: ...

    def where(self) -> str:
        """Where the snapshots are kept, for `monitor info`."""
        return "the hypervisor"

    def load_caveat(self) -> str | None:
        """What a load cannot put back as it was saved (e.g. a clock), to tell the user."""
        return None


class DriverError(Exception):
    """A request the hypervisor refused or could not carry out; the session turns it into `Exx`."""


class NotNow(DriverError):
    """The hypervisor cannot do this at this stop (it could at another); the message says what
    the user can do, and GDB is shown it."""


class MachineGone(DriverError):
    """The VM (or its hypervisor process) no longer exists."""


class Unsupported(DriverError):
    """The driver cannot do this at all (a dump cannot run, a read-only driver cannot write); the
    message says what. Its capabilities declared it, so the layers above normally ask first."""


class Driver(ABC):
    """A hypervisor as the debugger sees it. See the module docstring for the run-control contract.

    Subclasses override what their `capabilities` declare; every optional verb left alone raises
    `Unsupported`.
    """

    name: str
    capabilities: Capabilities
    snapshots: SnapshotStore | None = None  # whole-VM snapshots, where the hypervisor has them
    # Whether `insert_breakpoint` takes `conditions=` (GDB agent bytecode) and decides them itself
    # (the QEMU driver with vmigdb's plugin); the debugger still checks every hit it reports.
    decides_conditions: bool = False
    # The guest's address spaces (CR3 values of its processes), set by the debugger where it can
    # list them: a driver that must find every physical copy of a virtual address asks it.
    address_spaces: Callable[[], list[int]] | None = None

    # -- required: reading a stopped machine ------------------------------------------------------

    @abstractmethod
    def cpus(self) -> list[int]:
        """1-based vCPU numbers."""

    @abstractmethod
    def read_physical(self, pa: int, length: int) -> bytes:
        """Guest-physical read; raises PhysicalMemoryError outside RAM."""

    @abstractmethod
    def read_registers(self, cpu: int) -> RegisterFile: ...

    @abstractmethod
    def close(self) -> None:
        """Release everything; the VM is left as it is."""

    def physical_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical RAM as (start, end) ranges, for scans (e.g. finding the guest kernel)."""
        raise Unsupported(f"the {self.name} driver does not list guest RAM")

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) lines for `monitor info`."""
        return [("driver", self.name)]

    def warnings(self) -> list[str]:
        """What is wrong with the hypervisor or the machine's run that the user should act on
        (one line each, naming the fix): `monitor stealth` shows them, `monitor info` too."""
        return []

    # -- optional: writes (capabilities.memory_write, capabilities.register_write) ----------------

    def write_physical(self, pa: int, data: bytes) -> None:
        """Guest-physical write, through the hypervisor so translated code and views stay coherent."""
        raise Unsupported(f"the {self.name} driver cannot write guest memory")

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        raise Unsupported(f"the {self.name} driver cannot write registers")

    # -- optional: breakpoints (capabilities.sw_breakpoint, hw_breakpoint, watchpoint) ------------

    def insert_breakpoint(
        self,
        type: BreakpointType,
        addr: int,
        length: int,
        mechanism: str | None = None,
        scope_cr3: int | None = None,
    ) -> None:
        """`mechanism`: a declared mechanism's key to use instead of the type's default one.
        `scope_cr3`: the breakpoint counts only in the address space whose page tables are there
        (the debugger filters hits by it anyway; a driver may use it to keep the breakpoint out of
        other address spaces, and to translate `addr`)."""
        raise Unsupported(f"the {self.name} driver has no breakpoints")

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> None:
        raise Unsupported(f"the {self.name} driver has no breakpoints")

    # -- optional: run control (capabilities.run_control) -----------------------------------------

    def resume(self, actions: dict[int, str]) -> None:
        raise Unsupported(f"the {self.name} driver cannot run the guest")

    def stop_fileno(self) -> int | None:
        """The descriptor that becomes readable when a stop may be ready; None without one."""
        return None

    def poll_stop(self) -> DriverStop | None:
        raise Unsupported(f"the {self.name} driver cannot run the guest")

    def interrupt(self) -> None:
        raise Unsupported(f"the {self.name} driver cannot run the guest")

    def wait_stop(self, timeout: float) -> DriverStop:
        """Block until the running machine stops (after `interrupt`, or a step)."""
        raise Unsupported(f"the {self.name} driver cannot run the guest")

    # -- optional: catchpoints (monitor catch NAME) -----------------------------------------------

    def catchpoints(self) -> tuple[CatchKind, ...]:
        """The guest events this driver can stop on by itself; each stop carries `catch`."""
        return ()

    def set_catch(self, name: str, on: bool, scope_cr3: int | None = None) -> str:
        """Arm or disarm catchpoint `name` (while stopped); returns a one-line status.
        `scope_cr3`: only that address space (for a `scoped` catchpoint)."""
        raise Unsupported(f"the {self.name} driver has no catchpoint {name!r}")

    def kill(self) -> None:
        """Power the VM off and end the hypervisor process. A driver with no process (a dump)
        has nothing to power off: the session just ends."""
        return None
