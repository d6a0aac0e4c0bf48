"""One-instruction blocks on the pages of the plugin's breakpoints.

QEMU translates the code of any page holding one of its gdbstub breakpoints one instruction per
translation block (CF_BP_PAGE), so that it can check the breakpoint before each instruction.
vmigdb's plugin needs the same for its own breakpoints: a stop it holds inside a block, and the
first step from a stop it holds at a block's start, end where QEMU 10.0 has not yet written the
guest's lazily computed flags (eflags would be unavailable). So beside each plugin breakpoint
vmigdb puts a gdbstub breakpoint of its own, a *marker*, on the same page at an address where no
instruction starts (the second byte of an instruction of two bytes or more): QEMU then translates
that page instruction by instruction, and the marker itself never matches a block's start.
Code that jumps into the middle of that instruction would stop at the marker: the driver then
drops the marker and lets the guest go on (`PageMarkers.drop`).
"""

from __future__ import annotations

from collections.abc import Iterable

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

PAGE = 0x1000
_cs = Cs(CS_ARCH_X86, CS_MODE_64)


def marker_in(code: bytes, addr: int) -> int | None:
    """An address inside an instruction of `code` (decoded from `addr`, an instruction start),
    on `addr`'s page, where no instruction starts; None when the bytes give none."""
    page = addr & ~(PAGE - 1)
    for insn in _cs.disasm(code, addr):
        if insn.size >= 2 and (insn.address + 1) & ~(PAGE - 1) == page:
            return insn.address + 1
        if insn.address + insn.size >= page + PAGE:
            break
    return None


class PageMarkers:
    """Which page has which marker, and how many plugin breakpoints need it."""

    def __init__(self) -> None:
        self._marker: dict[int, int] = {}  # page -> marker address
        self._users: dict[int, set[int]] = {}  # page -> plugin breakpoint addresses
        self._dropped: set[int] = set()  # pages whose marker code ran into: none again

    def needs(self, addr: int) -> bool:
        """Does `addr`'s page still lack a marker (and may have one)?"""
        page = addr & ~(PAGE - 1)
        return page not in self._marker and page not in self._dropped

    def add(self, addr: int, marker: int | None) -> None:
        page = addr & ~(PAGE - 1)
        self._users.setdefault(page, set()).add(addr)
        if marker is not None and page not in self._marker:
            self._marker[page] = marker

    def remove(self, addr: int) -> int | None:
        """Forget a plugin breakpoint; the marker to take out when its page has no other one."""
        page = addr & ~(PAGE - 1)
        users = self._users.get(page, set())
        users.discard(addr)
        if users:
            return None
        self._users.pop(page, None)
        return self._marker.pop(page, None)

    def is_marker(self, addr: int) -> bool:
        return self._marker.get(addr & ~(PAGE - 1)) == addr

    def drop(self, addr: int) -> None:
        """The guest ran into a marker: its page keeps no marker from now on."""
        page = addr & ~(PAGE - 1)
        self._marker.pop(page, None)
        self._dropped.add(page)

    def markers(self) -> Iterable[int]:
        return list(self._marker.values())
