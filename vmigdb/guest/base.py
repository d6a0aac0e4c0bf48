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
class Mapping:
    """One region of a process's address space, as ``/proc/PID/maps`` shows it.

    :ivar perms: ``"r-xp"``: read, write, execute, then ``s`` shared or ``p`` private.
    :ivar offset: Offset in the file (0 for anonymous memory).
    :ivar dev: The file's device as (major, minor); (0, 0) for anonymous memory.
    :ivar name: The file's path, a kernel-given name (``[heap]``, ``[stack]``, ``[vdso]``...), or
        ``""`` for anonymous memory.
    """

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    name: str

    def line(self) -> str:
        """The ``/proc/PID/maps`` line (``show_map_vma()``): the name starts at column 73."""
        head = (
            f"{self.start:08x}-{self.end:08x} {self.perms} {self.offset:08x} "
            f"{self.dev[0]:02x}:{self.dev[1]:02x} {self.inode} "
        )
        return f"{head.ljust(72)} {self.name}" if self.name else head


@dataclass(frozen=True, slots=True)
class Library:
    """A shared object (or the program itself) mapped in a process, or a kernel module: what GDB
    lists in ``info sharedlibrary``.

    :ivar path: Its file name in the guest (``/lib/x86_64-linux-gnu/libc.so.6``, ``[vdso]``), or
        a module's name.
    :ivar base: Its load address (the start of its first mapping; a module's core).
    :ivar key: What tells this instance apart from another one at the same path and address
        (e.g. the mapped file's device and inode).
    """

    path: str
    base: int
    key: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SyscallFrame:
    """A system call as the kernel took it: the caller's registers as the kernel saved them
    (Linux: ``struct pt_regs``), and where each one is saved, so a debugger can change them.

    :ivar number: The system call's number.
    :ivar registers: GDB's register name (``rax``..``r15``, ``rip``, ``eflags``, ``cs``, ``ss``,
        ``rsp``, ``orig_rax``) -> the caller's value.
    :ivar slots: The same names -> kernel virtual address of the 8-byte slot holding each.
    :ivar returns: False for calls that never return to the instruction after them (exit,
        exit_group, rt_sigreturn).
    :ivar frame: Address of the saved registers: what identifies the calling thread meanwhile.
    """

    number: int
    registers: dict[str, int]
    slots: dict[str, int]
    returns: bool
    frame: int


@dataclass(frozen=True, slots=True)
class ExecEvent:
    """A process has just replaced its program (execve), before its first user instruction.

    :ivar entry: The address of the first instruction it will run (the dynamic loader's entry
        for a dynamically linked program).
    :ivar cr3: The physical address of its new page tables.
    """

    pid: int
    comm: str
    path: str
    entry: int
    cr3: int


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """Where a process's program is: for the message at a caught exec.

    :ivar entry: The program's own entry point (``AT_ENTRY``).
    :ivar load_address: Where its first mapping starts.
    :ivar interpreter: The dynamic loader's load address (``AT_BASE``), or None (static).
    """

    path: str
    entry: int
    load_address: int
    interpreter: int | None


@dataclass(frozen=True, slots=True)
class ModuleLoad:
    """A kernel module loaded, its symbols known, its init function not yet run."""

    name: str
    base: int
    size: int
    init: int  # 0: it has none


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

    @property
    def exec_elf(self) -> bytes:
        """What GDB loads as its executable (`exec_file_name`): `symbol_elf`, unless the OS
        serves its modules as shared libraries of their own (`libraries(None)`)."""
        return self.symbol_elf

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

    # -- inside a process (issue 18); an OS that cannot answer raises GuestError ------------------

    def mappings(self, pid: int) -> list[Mapping]:
        """The process's memory map, as ``/proc/PID/maps`` would list it. :raises GuestError:"""
        raise GuestError(f"{self.kind}: memory maps are not supported")

    def libraries(self, pid: int | None) -> list[Library]:
        """The shared objects (and the program itself) mapped in process `pid`; with None, the
        kernel's modules. :raises GuestError:"""
        raise GuestError(f"{self.kind}: shared libraries are not supported")

    def library_elf(self, pid: int | None, library: Library) -> bytes:
        """A symbols-only ELF for `library`, rebuilt from what the guest has in memory, with every
        symbol at its running address. :raises GuestError:"""
        raise GuestError(f"{self.kind}: shared libraries are not supported")

    def library_symbol(self, pid: int, library: Library, name: str) -> int | None:
        """The running address of an exported symbol of `library` in process `pid`, or None.
        :raises GuestError:"""
        raise GuestError(f"{self.kind}: shared libraries are not supported")

    def loader_hook(self, pid: int) -> int | None:
        """Where process `pid`'s dynamic loader tells a debugger its list of libraries changed
        (a user-mode code address), or None (a static program). :raises GuestError:"""
        return None

    def read_unmapped(self, pid: int, address: int, size: int) -> bytes:
        """Up to `size` bytes of process `pid`'s memory at `address` that its page tables do not
        map yet but the OS has in memory anyway (a mapped file's page in the page cache, the
        page the process will see when it touches it). Empty when there is none."""
        return b""

    def image_info(self, pid: int) -> ImageInfo:
        """Where the process's program is loaded and starts. :raises GuestError:"""
        raise GuestError(f"{self.kind}: program images are not supported")

    # -- hooks: kernel code addresses the debugger places its own breakpoints on -----------------

    def syscall_hooks(self, numbers: frozenset[int] | None) -> list[int]:
        """Kernel code addresses every system call of one of `numbers` (None: any) passes at its
        start, where `syscall_frame` can read it. :raises GuestError:"""
        raise GuestError(f"{self.kind}: system-call hooks are not supported")

    def syscall_frame(self, regs: RegisterFile) -> SyscallFrame | None:
        """At a `syscall_hooks` address: the system call, or None if the vCPU is not in one a
        process made. :raises GuestError:"""
        raise GuestError(f"{self.kind}: system-call hooks are not supported")

    def exec_hook(self) -> int:
        """A kernel code address every successful execve passes once the new program is mapped
        and before it runs. :raises GuestError:"""
        raise GuestError(f"{self.kind}: exec hooks are not supported")

    def exec_event(self, regs: RegisterFile) -> ExecEvent | None:
        """At the `exec_hook` address: which process runs what, or None. :raises GuestError:"""
        raise GuestError(f"{self.kind}: exec hooks are not supported")

    def module_load_hook(self) -> int:
        """A kernel code address every module load passes once its symbols are set up and before
        its init function runs. :raises GuestError:"""
        raise GuestError(f"{self.kind}: module-load hooks are not supported")

    def module_load_event(self, regs: RegisterFile) -> ModuleLoad | None:
        """At the `module_load_hook` address: the module being loaded. :raises GuestError:"""
        raise GuestError(f"{self.kind}: module-load hooks are not supported")

    # -- health -----------------------------------------------------------------------------------

    def death_hooks(self) -> list[DeathHook]:
        """Where the kernel goes when it starts dying (none known: nothing to watch)."""
        return []

    def describe_death(self, hook: DeathHook, regs: RegisterFile, cpu_name: str) -> str:
        """One line saying what is happening, for a vCPU with registers `regs` at `hook`."""
        return f"the guest kernel is dying ({hook.symbol}) on {cpu_name}"
