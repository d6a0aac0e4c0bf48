"""What GDB asked to stop on, in guest-physical terms: breakpoints, watchpoints, and their matching.

GDB gives virtual addresses; EPT works on guest-physical pages, so each request is translated once,
when it is made, with vmigdb's page walk: through the scoped address space's page tables, else
through those of every vCPU (a kernel address maps to one page in all; a user address to the page
each address space running on a vCPU maps there). A page the guest maps elsewhere later keeps the
breakpoint where it was placed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone.x86 import X86_OP_MEM

from vmigdb.arch.x86_64.paging import Fault, PagingMode, PhysicalMemoryError, Translator
from vmigdb.hv.base import BreakpointType, DriverError

PAGE = 0x1000
R, W, X = 2, 4, 8  # VMI_MEMACCESS_R/W/X

# What each watchpoint type traps. Xen cannot trap reads alone (an EPT entry that is writable
# but not readable is a misconfiguration; libvmi refuses R and RX): reads trap with writes, and
# the writes are filtered out here.
WATCH_TRAP = {
    BreakpointType.WRITE_WATCH: W,
    BreakpointType.READ_WATCH: R | W,
    BreakpointType.ACCESS_WATCH: R | W,
}
WATCH_FIRES = {
    BreakpointType.WRITE_WATCH: W,
    BreakpointType.READ_WATCH: R,
    BreakpointType.ACCESS_WATCH: R | W,
}


def cr3_base(cr3: int) -> int:
    """CR3 as an address-space identity: without PCID bits and the PTI user/kernel bit (bit 12),
    as the debugger compares scopes."""
    return cr3 & 0x000F_FFFF_FFFF_E000


@dataclass
class ExecBreak:
    """A breakpoint GDB placed at `va` (Z0/Z1): the guest-physical bytes it covers."""

    va: int
    scope: int | None  # page-table base, or None for every address space
    places: list[tuple[int, int]]  # (gfn, offset)
    views: list[int] = field(default_factory=list)  # where it is planted


@dataclass
class Watch:
    type: BreakpointType
    va: int
    length: int
    ranges: list[tuple[int, int]]  # guest-physical [start, end)

    def gfns(self) -> set[int]:
        return {start // PAGE for start, _ in self.ranges}  # each range lies within one page

    def hit(self, pa: int, size: int, access: int) -> bool:
        if not access & WATCH_FIRES[self.type]:
            return False
        return any(pa < end and start < pa + size for start, end in self.ranges)


class Translate:
    """Virtual to guest-physical, through given page tables."""

    def __init__(self, read_physical: Callable[[int, int], bytes]) -> None:
        self._translator = Translator(read_physical)

    def pa(self, cr3: int, va: int, mode: PagingMode) -> int | None:
        self._translator.flush()
        try:
            where = self._translator.translate(cr3, va, mode)
        except PhysicalMemoryError:
            return None
        return None if isinstance(where, Fault) else where.pa

    def places(self, cr3s: Iterable[int], va: int, length: int, mode: PagingMode) -> list[int]:
        """The distinct guest-physical addresses of each page-sized piece of [va, va+length) in each
        address space; raises DriverError if some piece is mapped in none of them."""
        found: list[int] = []
        cr3s = list(cr3s)
        pieces = _pieces(va, length)
        for piece, _size in pieces:
            mapped = [pa for cr3 in cr3s if (pa := self.pa(cr3, piece, mode)) is not None]
            if not mapped:
                spaces = ", ".join(f"{cr3:#x}" for cr3 in cr3s)
                raise DriverError(f"{piece:#x} is not mapped (page tables at {spaces})")
            found += [pa for pa in mapped if pa not in found]
        return found

    def ranges(
        self, cr3s: Iterable[int], va: int, length: int, mode: PagingMode
    ) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        cr3s = list(cr3s)
        for piece, size in _pieces(va, length):
            for pa in self.places(cr3s, piece, 1, mode):
                if (pa, pa + size) not in out:
                    out.append((pa, pa + size))
        return out


def _pieces(va: int, length: int) -> list[tuple[int, int]]:
    out = []
    end = va + max(length, 1)
    while va < end:
        size = min(end - va, PAGE - va % PAGE)
        out.append((va, size))
        va += size
    return out


_DISASSEMBLER = Cs(CS_ARCH_X86, CS_MODE_64)
_DISASSEMBLER.detail = True


def access_size(code: bytes, rip: int) -> int:
    """Bytes the instruction at `rip` reads or writes through its memory operand (8 when it has
    none to tell: a push, a string instruction...)."""
    for insn in _DISASSEMBLER.disasm(code, rip, 1):
        sizes = [op.size for op in insn.operands if op.type == X86_OP_MEM]
        return max(sizes) if sizes else 8
    return 8
