"""The OS-awareness interface: what the debugger knows about the guest's operating system.

One implementation per OS (`vmigdb.guest.linux.linux_os.LinuxOS`; a Windows one would sit beside it), found
by `vmigdb.guest.registry.attach`, which is the only door the layers above use. Everything is read
out of guest memory, never written; an implementation keeps what it derived (layouts, symbol
tables) until `refresh` says the guest ran.

Names follow what they return, as drgn's helpers do; a query that cannot be answered (a missing
symbol or structure, a corrupted list, unreadable memory) raises `GuestError` with what was missing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.errors import VmigdbError


class GuestError(VmigdbError):
    """The guest's OS data could not be read or understood; the message says what."""


class GuestNotFound(GuestError):
    """No OS vmigdb knows could be identified in guest memory; the message says why, per OS."""


@dataclass(frozen=True, slots=True)
class Symbol:
    """One kernel symbol.

    :ivar name: ``"default_idle"``.
    :ivar address: Its runtime (KASLR-slid) address; small values are per-CPU offsets.
    :ivar type: The ``nm`` type letter: ``T``/``t`` text, ``D``/``d`` data, ``R``/``r``
        read-only, ``B``/``b`` bss, ``A`` absolute (per-CPU); upper case is global.
    """

    name: str
    address: int
    type: str


@dataclass(frozen=True, slots=True)
class Process:
    """A process (or one of its threads), as read at one moment.

    :ivar pid: Its id (a thread's own id, for a thread).
    :ivar ppid: Its parent process's id, as ``ps`` shows it.
    :ivar comm: Its name (the executable's, at most 15 characters on Linux).
    :ivar cr3: Physical address of its page tables (what CR3 holds while it runs, without PCID
        bits); None for a kernel thread, which has no address space of its own.
    :ivar state: One letter, as in ``ps`` (R running, S sleeping...).
    :ivar leader: It is the process itself, not one of its other threads.
    """

    pid: int
    ppid: int
    comm: str
    cr3: int | None
    state: str
    leader: bool = True


@dataclass(frozen=True, slots=True)
class Module:
    """A loaded kernel module (driver): its name and where its code is."""

    name: str
    base: int
    size: int


@dataclass(frozen=True, slots=True)
class DeathHook:
    """A kernel code address the OS passes when it starts dying (an oops, a panic)."""

    address: int
    symbol: str
    kind: str  # "oops" or "panic"


class GuestOS(ABC):
    """One analysed guest OS instance. See the module docstring."""

    kind: str  # "Linux"

    # -- the instance -----------------------------------------------------------------------------

    @abstractmethod
    def fingerprint(self) -> object:
        """A value read from the guest that changes when another OS instance runs (a reboot
        moves the kernel): the debugger compares it at each new connection. :raises GuestError:"""

    @abstractmethod
    def refresh(self) -> None:
        """The guest ran: forget cached reads of its memory (derived layouts may stay)."""

    @abstractmethod
    def describe(self) -> list[tuple[str, str]]:
        """(label, value) lines for `monitor info`, the first one ("guest", what OS)."""

    # -- symbols ----------------------------------------------------------------------------------

    @abstractmethod
    def lookup_symbol(self, name: str) -> Symbol | None:
        """The kernel symbol called `name`, or None."""

    @property
    @abstractmethod
    def exec_file_name(self) -> str:
        """The name GDB is given for the symbol file (`qXfer:exec-file:read`, then `vFile`)."""

    @property
    @abstractmethod
    def symbol_elf(self) -> bytes:
        """An ELF with the kernel's (and its modules') symbols at their running addresses."""

    # -- processes --------------------------------------------------------------------------------

    @abstractmethod
    def processes(self) -> list[Process]:
        """Every process (leaders only), in the kernel's own order. :raises GuestError:"""

    @abstractmethod
    def find_process(self, pid: int) -> Process | None:
        """The process or thread whose id is `pid`, or None. :raises GuestError:"""

    @abstractmethod
    def find_processes(self, name: str) -> list[Process]:
        """Every process (leaders only) called `name`. :raises GuestError:"""

    @abstractmethod
    def current_process(self, regs: RegisterFile) -> Process | None:
        """What a vCPU with registers `regs` is running, or None if that cannot be told (early
        boot, a vCPU not started). :raises GuestError:"""

    @abstractmethod
    def process_exit_hook(self) -> int | None:
        """A kernel code address every exiting process passes, in its own address space (Linux:
        ``do_exit``), or None if there is none."""

    # -- modules ----------------------------------------------------------------------------------

    @abstractmethod
    def modules(self) -> list[Module]:
        """The loaded kernel modules. :raises GuestError:"""

    # -- health -----------------------------------------------------------------------------------

    def death_hooks(self) -> list[DeathHook]:
        """Where the kernel goes when it starts dying (none known: nothing to watch)."""
        return []

    def describe_death(self, hook: DeathHook, regs: RegisterFile, cpu_name: str) -> str:
        """One line saying what is happening, for a vCPU with registers `regs` at `hook`."""
        return f"the guest kernel is dying ({hook.symbol}) on {cpu_name}"
