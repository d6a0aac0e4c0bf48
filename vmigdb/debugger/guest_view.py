"""The debugger's handle on guest awareness: attaches on first use, remembers why it could not.

Analysing the kernel (VMCOREINFO scan, kallsyms decode) takes a fraction of a second, so it happens
once, when something first needs it, and is kept across GDB connections. A reboot moves the kernel
(KASLR): each new connection checks the banner is still where it was, and analyses again if not.
When the guest cannot be analysed, plain debugging goes on and the reason is one line.
"""

from __future__ import annotations

import logging

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.guest.linux.btf import BtfError
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.kallsyms import KallsymsNotFound
from vmigdb.guest.linux.kernel import FaultError, KernelNotFound
from vmigdb.hv.base import Driver, DriverError

log = logging.getLogger("vmigdb.debugger")

ANALYSIS_ERRORS = (
    KernelNotFound,
    KallsymsNotFound,
    BtfError,
    FaultError,
    PhysicalMemoryError,
    DriverError,
)


class GuestUnavailable(Exception):
    """The guest's OS could not be analysed; the message says what was not found."""


class GuestView:
    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._linux: LinuxGuest | None = None
        self._error: str | None = None
        self._banner: tuple[int, bytes] | None = None

    def linux(self) -> LinuxGuest:
        """:raises GuestUnavailable:"""
        if self._linux is None:
            if self._error is not None:
                raise GuestUnavailable(self._error)
            try:
                self._linux = LinuxGuest.attach(
                    self._driver.read_physical, self._driver.physical_ranges()
                )
                self._banner = self._read_banner(self._linux)
            except ANALYSIS_ERRORS as exc:
                self._error = f"no Linux kernel vmigdb can analyse: {exc}"
                log.warning("%s (plain debugging goes on)", self._error)
                raise GuestUnavailable(self._error) from None
        return self._linux

    def available(self) -> bool:
        try:
            self.linux()
        except GuestUnavailable:
            return False
        return True

    def ran(self) -> None:
        """The guest ran: cached reads of its memory are stale."""
        if self._linux is not None:
            self._linux.refresh()

    def revalidate(self) -> None:
        """At a new connection: if the guest rebooted (banner moved), analyse it again."""
        if self._linux is not None:
            try:
                same = self._read_banner(self._linux) == self._banner
            except ANALYSIS_ERRORS:
                same = False
            if not same:
                log.info("the guest kernel changed; analysing it again")
                self._linux = None
        self._error = None

    @staticmethod
    def _read_banner(linux: LinuxGuest) -> tuple[int, bytes]:
        address = linux.symbols.address("linux_banner")
        return address, linux.memory.read(address, 64)
