"""The debugger's handle on guest awareness: attaches on first use, remembers why it could not.

Analysing the guest's OS (for Linux: VMCOREINFO scan, kallsyms decode) takes a fraction of a second,
so it happens once, when something first needs it, and is kept across GDB connections. A reboot
moves the kernel (KASLR): each new connection checks the OS's fingerprint is still what it was, and
analyses again if not. When the guest cannot be analysed, plain debugging goes on and the reason is
one line. Which OS it is, and how it is read, is `vmigdb.guest`'s business (`registry.attach`).
"""

from __future__ import annotations

import logging
from typing import NoReturn

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.guest import registry
from vmigdb.guest.base import GuestError, GuestOS
from vmigdb.hv.base import Driver, DriverError

log = logging.getLogger("vmigdb.debugger")

# What reading the guest's OS can fail with: its own errors, and the driver's reads.
ANALYSIS_ERRORS = (GuestError, PhysicalMemoryError, DriverError)


class GuestUnavailable(Exception):
    """The guest's OS could not be analysed; the message says what was not found."""


class GuestView:
    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._os: GuestOS | None = None
        self._error: str | None = None
        self._fingerprint: object = None

    def os(self) -> GuestOS:
        """The guest's OS, analysed on first use. :raises GuestUnavailable:"""
        if self._os is None:
            if self._error is not None:
                raise GuestUnavailable(self._error)
            try:
                ranges = self._driver.physical_ranges()
            except DriverError as exc:
                self._fail(f"no guest OS vmigdb can analyse: {exc}")
            try:
                self._os = registry.attach(self._driver.read_physical, ranges)
                self._fingerprint = self._os.fingerprint()
            except ANALYSIS_ERRORS as exc:
                self._os = None
                self._fail(str(exc))
        return self._os

    def _fail(self, reason: str) -> NoReturn:
        self._error = reason
        log.warning("%s (plain debugging goes on)", reason)
        raise GuestUnavailable(reason) from None

    def prepare(self) -> None:
        """Analyse the guest now, and build what GDB fetches at connect (the symbol file): for
        a machine that never changes (a dump), done before GDB connects, so its first prompt
        does not wait for it. An unanalysable guest is only logged (plain debugging goes on)."""
        try:
            self.os().symbol_elf  # noqa: B018 - built and kept by the OS object
        except GuestUnavailable:
            pass
        except ANALYSIS_ERRORS as exc:
            log.warning("cannot build the guest's symbol file: %s", exc)

    def address_spaces(self) -> list[int]:
        """The CR3 of every process the guest's OS lists (none when it cannot be analysed)."""
        try:
            return [p.cr3 for p in self.os().processes() if p.cr3]
        except (GuestUnavailable, *ANALYSIS_ERRORS):
            return []

    def available(self) -> bool:
        try:
            self.os()
        except GuestUnavailable:
            return False
        return True

    def ran(self) -> None:
        """The guest ran: cached reads of its memory are stale."""
        if self._os is not None:
            self._os.refresh()

    def revalidate(self) -> None:
        """At a new connection: if the guest rebooted (fingerprint changed), analyse it again."""
        if self._os is not None:
            try:
                same = self._os.fingerprint() == self._fingerprint
            except ANALYSIS_ERRORS:
                same = False
            if not same:
                log.info("the guest kernel changed; analysing it again")
                self._os = None
        self._error = None
