"""The hypervisor driver interface: what the debugger may ask of a hypervisor, and how honestly it answers.

A driver is small. It declares its mechanisms up front (`Capabilities`), each with whether the guest
could observe it, so the debugger can choose a mechanism per request and `monitor stealth` can say the
truth. Everything else is plain verbs on a stopped machine, plus a file descriptor to watch while the
guest runs.

Theory of operation (all-stop):
- While stopped, every call is synchronous and answered at once.
- `resume(actions)` starts the vCPUs named in `actions` ('c' continue, 's' step one instruction); vCPUs
  not named stay stopped. The call returns at once.
- While running, the owner watches `stop_fileno()`; when it is readable, `poll_stop()` returns a
  `DriverStop` (every vCPU is stopped again) or `None` (nothing complete yet).
- `interrupt()` asks a running machine to stop; the stop arrives through `poll_stop()` like any other.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
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
    """The mechanisms a driver offers for each debugger job. `None` means the job is unsupported."""

    registers: Mechanism
    memory_read: Mechanism
    memory_write: Mechanism | None
    sw_breakpoint: Mechanism | None  # what serves GDB's Z0
    hw_breakpoint: Mechanism | None  # what serves GDB's Z1
    watchpoint: Mechanism | None  # Z2/Z3/Z4
    single_step: Mechanism | None
    extra: tuple[Mechanism, ...] = field(default=())  # anything else the driver does to the VM
    # A visible way to serve Z0 once the invisible one is exhausted (e.g. 0xCC patched into RAM
    # under KVM after the 4 debug registers); used only if the stealth policy allows it.
    sw_breakpoint_fallback: Mechanism | None = None
    # What the guest's clocks show of the debugger's work (stops, retranslation): every job that
    # stops the guest or changes its code's translation is only as invisible as this.
    guest_time: Mechanism | None = None

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
    an exit status once the VM is gone; no further calls are valid then.
    """

    cpu: int | None
    signal: int
    watch: tuple[BreakpointType, int] | None = None
    exited: int | None = None


class DriverError(Exception):
    """A request the hypervisor refused or could not carry out; the session turns it into `Exx`."""


class MachineGone(DriverError):
    """The VM (or its hypervisor process) no longer exists."""


class Unsupported(DriverError):
    """The driver cannot do this at all (a dump cannot run, a read-only driver cannot write); the
    message says what. Its capabilities declared it, so the layers above normally ask first."""


class Driver(ABC):
    """A hypervisor as the debugger sees it. See the module docstring for the run-control contract."""

    name: str
    capabilities: Capabilities

    @abstractmethod
    def cpus(self) -> list[int]:
        """1-based vCPU numbers."""

    @abstractmethod
    def read_physical(self, pa: int, length: int) -> bytes:
        """Guest-physical read; raises PhysicalMemoryError outside RAM."""

    def physical_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical RAM as (start, end) ranges, for scans (e.g. finding the guest kernel)."""
        raise DriverError(f"the {self.name} driver does not list guest RAM")

    @abstractmethod
    def write_physical(self, pa: int, data: bytes) -> None:
        """Guest-physical write, through the hypervisor so translated code and views stay coherent."""

    @abstractmethod
    def read_registers(self, cpu: int) -> RegisterFile: ...

    @abstractmethod
    def write_register(self, cpu: int, regnum: int, value: bytes) -> None: ...

    @abstractmethod
    def insert_breakpoint(
        self, type: BreakpointType, addr: int, length: int, mechanism: str | None = None
    ) -> None:
        """`mechanism`: a declared mechanism's key to use instead of the type's default one."""

    @abstractmethod
    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> None: ...

    @abstractmethod
    def resume(self, actions: dict[int, str]) -> None: ...

    @abstractmethod
    def stop_fileno(self) -> int: ...

    @abstractmethod
    def poll_stop(self) -> DriverStop | None: ...

    @abstractmethod
    def interrupt(self) -> None: ...

    @abstractmethod
    def wait_stop(self, timeout: float) -> DriverStop:
        """Block until the running machine stops (after `interrupt`, or a step)."""

    @abstractmethod
    def kill(self) -> None:
        """Power the VM off and end the hypervisor process."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; the VM is left as it is."""

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) lines for `monitor info`."""
        return [("driver", self.name)]
