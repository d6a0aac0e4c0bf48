"""Which OS runs in the guest: the one door from the layers above to the OS implementations.

`attach` asks each known OS in turn to recognise itself in guest-physical memory and returns the
first that does. Linux is the only one today; a Windows implementation of `GuestOS` goes into
`_KNOWN` beside it, and nothing above this module changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vmigdb.arch.x86_64.paging import PhysicalMemoryError, ReadPhys
from vmigdb.guest.base import GuestError, GuestNotFound, GuestOS
from vmigdb.guest.linux.linux_os import LinuxOS

log = logging.getLogger("vmigdb.guest")

Attach = Callable[[ReadPhys, list[tuple[int, int]]], GuestOS]
Locate = Callable[[ReadPhys, list[tuple[int, int]]], tuple[int, bool]]

# (the OS's kernel as a user names it, how to recognise and attach to it), tried in order
_KNOWN: tuple[tuple[str, Attach], ...] = (("Linux kernel", LinuxOS.attach),)
# (the same name, how to find its own page tables in RAM alone), tried in order
_PAGE_TABLES: tuple[tuple[str, Locate], ...] = (("Linux kernel", LinuxOS.kernel_page_tables),)


def attach(read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]) -> GuestOS:
    """The guest's OS, analysed from its memory alone.

    :param ram_ranges: ``(start, end)`` guest-physical RAM ranges, end exclusive.
    :raises GuestNotFound: saying, for each OS tried, why it was not recognised.
    """
    reasons = []
    for what, recognise in _KNOWN:
        try:
            return recognise(read_phys, ram_ranges)
        except (GuestError, PhysicalMemoryError) as exc:
            log.debug("not a %s: %s", what, exc)
            reasons.append(f"no {what} vmigdb can analyse: {exc}")
    raise GuestNotFound("; ".join(reasons))


def kernel_page_tables(read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]) -> tuple[int, bool]:
    """The guest kernel's own top-level page table (guest-physical) and whether it is 5-level:
    what translates kernel addresses in a memory image saved without registers. Lighter than
    `attach` (no symbol table is decoded).

    :raises GuestNotFound: saying, for each OS tried, why no kernel was found.
    """
    reasons = []
    for what, locate in _PAGE_TABLES:
        try:
            return locate(read_phys, ram_ranges)
        except (GuestError, PhysicalMemoryError) as exc:
            reasons.append(f"no {what}: {exc}")
    raise GuestNotFound("; ".join(reasons))
