"""The model's MMU: x86-64 4-level page walk for one access, as the CPU does it.

This is the model's own walker (not vmigdb's): the model plays the hardware, and the code under
test must agree with it independently. It checks present, write (with CR0.WP), user (with the
current privilege level) and NX, and reports a #PF error code when the guest's tables refuse.
Not modelled: accessed/dirty bit updates, PKEYs, SMEP/SMAP, 5-level paging, EPT checks on the
walk's own table reads (the walk reads tables through the current view's mapping, unrestricted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

PTE_P, PTE_W, PTE_U, PTE_PS = 1, 2, 4, 0x80
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000

PF_P, PF_W, PF_U, PF_I = 1, 2, 4, 16


class Access(Enum):
    READ = "r"
    WRITE = "w"
    FETCH = "x"


@dataclass(frozen=True)
class Translation:
    gpa: int
    writable: bool
    user: bool
    executable: bool


@dataclass(frozen=True)
class PageFault:
    """The guest's own tables refuse the access: deliver #PF with this error code and CR2."""

    address: int
    error_code: int


@dataclass(frozen=True)
class NonCanonical:
    """The address is not canonical: the CPU raises #GP(0) (not a page fault)."""

    address: int


def canonical(va: int) -> bool:
    top = va >> 47
    return top in (0, 0x1FFFF)


def walk(read_qword: Callable[[int], int], cr3: int, va: int, access: Access, *, cpl: int,
         wp: bool, nxe: bool) -> Translation | PageFault | NonCanonical:
    """Translate `va` for `access` at privilege `cpl`; `read_qword` reads guest-physical memory."""
    if not canonical(va):
        return NonCanonical(va)
    table = cr3 & ADDR_MASK
    writable = user = executable = True
    size_shift = 12
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = read_qword(table + ((va >> shift) & 0x1FF) * 8)
        if not entry & PTE_P:
            return PageFault(va, _error_code(access, cpl, nxe, present=False))
        writable &= bool(entry & PTE_W)
        user &= bool(entry & PTE_U)
        executable &= not (nxe and entry & PTE_NX)
        if level in (1, 2) and entry & PTE_PS:
            size_shift = shift
            break
        table = entry & ADDR_MASK
    base = entry & ADDR_MASK & ~((1 << size_shift) - 1)
    gpa = base | (va & ((1 << size_shift) - 1))
    if cpl == 3 and not user:
        return PageFault(va, _error_code(access, cpl, nxe, present=True))
    if access is Access.WRITE and not writable and (cpl == 3 or wp):
        return PageFault(va, _error_code(access, cpl, nxe, present=True))
    if access is Access.FETCH and not executable:
        return PageFault(va, _error_code(access, cpl, nxe, present=True))
    return Translation(gpa, writable or (cpl != 3 and not wp), user, executable)


def _error_code(access: Access, cpl: int, nxe: bool, *, present: bool) -> int:
    code = PF_P if present else 0
    code |= PF_W if access is Access.WRITE else 0
    code |= PF_U if cpl == 3 else 0
    code |= PF_I if access is Access.FETCH and nxe else 0
    return code
