"""What a scripted session hands back: processes, mappings, instructions, stops, breakpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

# CR3 without PCID bits and the PTI user/kernel bit: what a process's page tables are known by.
CR3_BASE_MASK = 0x000F_FFFF_FFFF_E000


@dataclass(frozen=True, slots=True)
class Process:
    """A guest process, as `monitor ps` reads it from guest memory."""

    pid: int
    ppid: int
    name: str
    cr3: int | None  # its page tables; None for a kernel thread
    state: str


@dataclass(frozen=True, slots=True)
class Mapping:
    """A run of mapped virtual pages with the same permissions (`monitor info mem`)."""

    start: int
    end: int  # exclusive
    user: bool
    writable: bool

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Page:
    """One present page and its frame (`monitor pages`)."""

    va: int
    pa: int
    size: int  # 4K, 2M or 1G
    user: bool
    writable: bool
    nx: bool


@dataclass(frozen=True, slots=True)
class Instruction:
    address: int
    bytes: bytes
    mnemonic: str
    op_str: str

    def __str__(self) -> str:
        return f"{self.address:#x}: {self.mnemonic} {self.op_str}".rstrip()


class _Session(Protocol):
    """What a stop needs of its session (`vmigdb.script.session.Session`)."""

    def regs(self, cpu: int | None = None) -> dict[str, int]: ...
    def read(self, addr: int, n: int) -> bytes: ...
    def read_string(self, addr: int, limit: int = 4096) -> str: ...
    def process_of(self, cr3: int) -> Process | None: ...


@dataclass(eq=False)
class Breakpoint:
    """A breakpoint set by `Session.on_break`; `hits` counts the stops it caused."""

    number: int
    location: str
    callback: Callable[[Stop], object] | None
    hits: int = 0


@dataclass(eq=False)
class Stop:
    """The machine stopped: why, on which vCPU, at what address. Registers, memory and the
    process are read on demand, while the machine is still stopped (inside a callback, or
    until the session runs again)."""

    session: _Session
    reason: str  # "breakpoint", "watchpoint", "step", "interrupt", "timeout", "exited", ...
    cpu: int | None  # 0-based vCPU index (GDB's thread CPU#n), None if the machine is gone
    address: int | None
    breakpoint: Breakpoint | None = None
    record: dict = field(default_factory=dict, repr=False)  # GDB's *stopped record

    @cached_property
    def regs(self) -> dict[str, int]:
        return self.session.regs(self.cpu)

    def read(self, addr: int, n: int) -> bytes:
        return self.session.read(addr, n)

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def read_string(self, addr: int, limit: int = 4096) -> str:
        return self.session.read_string(addr, limit)

    @cached_property
    def process(self) -> Process | None:
        """The process whose page tables the stopped vCPU runs with (None: a kernel thread, or
        not a process vmigdb can list)."""
        return self.session.process_of(self.regs["cr3"])
