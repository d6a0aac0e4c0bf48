"""The memory map as clients ask for it: the /proc files debugger plugins fetch over `vFile`, and
LLDB's `qMemoryRegionInfo`, made from the guest's page tables.

GDB's `info proc mappings`, GEF and pwndbg read `/proc/PID/maps` (and GEF also copies
`/proc/PID/exe`, `cmdline` and `environ` when it sets up a remote session) through GDB's remote file
I/O. For a whole machine those files do not exist on any host, so vmigdb makes them:

- for GDB's own pid (42000: what GDB calls the inferior of a stub without multiprocess, which
  is the machine): `maps` lists every mapping of the address space GDB reads through (the scoped
  process's, else the current vCPU's), kernel half included; `exe` is the kernel symbol ELF GDB
  loads at connect (the machine's "executable"); `cmdline` and `environ` are empty;
- for a guest process's pid: `maps` lists the user pages of its page tables, as Linux shows
  them (empty for a kernel thread).

Lines follow Linux's format (`start-end perms offset dev inode`), one per run of pages with the same
permissions; the page tables say nothing of files, so offset, device and inode are 0 and there
is no path. Any other path is no file (ENOENT).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vmigdb.arch.x86_64.pagemap import Leaf, canonical, regions
from vmigdb.arch.x86_64.paging import PagingMode
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.guest_view import GuestUnavailable
from vmigdb.guest.base import GuestError

GDB_PID = 42000  # GDB's remote.c: the pid of a remote inferior when the stub has no multiprocess

_PATH = re.compile(r"/proc/(\d+)/(maps|exe|cmdline|environ)")


def maps_text(mode: PagingMode, pages: list[Leaf]) -> str:
    """/proc/PID/maps lines for `pages`."""
    lines = []
    for region in regions(iter(pages)):
        start = canonical(region.start, mode) & ((1 << 64) - 1)
        end = canonical(region.end - 1, mode) & ((1 << 64) - 1)
        perms = f"r{'w' if region.writable else '-'}{'-' if region.nx else 'x'}p"
        lines.append(f"{start:08x}-{end + 1:08x} {perms} 00000000 00:00 0 ")
    return "".join(line + "\n" for line in lines)


def region_info(mode: PagingMode, pages: list[Leaf], addr: int) -> bytes:
    """LLDB's `qMemoryRegionInfo` reply for `addr`: the run of pages with equal permissions
    holding it, or the unmapped gap up to the next one (no `permissions` key: not mapped)."""
    spans = [
        (canonical(r.start, mode) & ((1 << 64) - 1), canonical(r.end - 1, mode) + 1, r)
        for r in regions(iter(pages))
    ]
    gap_start = 0
    for start, end, region in sorted(spans, key=lambda span: span[0]):
        if start <= addr < end:
            perms = f"r{'w' if region.writable else ''}{'' if region.nx else 'x'}"
            return b"start:%x;size:%x;permissions:%s;" % (start, end - start, perms.encode())
        if addr < start:
            return b"start:%x;size:%x;" % (gap_start, start - gap_start)
        gap_start = end
    return b"start:%x;size:%x;" % (gap_start, (1 << 64) - gap_start)


class GuestProcfs:
    """Answers `contents(path)` for the vFile server of one session."""

    def __init__(self, debugger: Debugger, current_cpu: Callable[[], int]) -> None:
        self._debugger = debugger
        self._current_cpu = current_cpu

    def contents(self, path: str) -> bytes | None:
        match = _PATH.fullmatch(path)
        if match is None:
            return None
        pid, name = int(match.group(1)), match.group(2)
        try:
            if pid == GDB_PID:
                return self._machine_file(name)
            return self._process_file(pid, name)
        except (GuestUnavailable, GuestError):
            return None

    def _machine_file(self, name: str) -> bytes | None:
        if name == "maps":
            mode, pages = self._debugger.mappings(self._current_cpu())
            return maps_text(mode, pages).encode()
        if name == "exe":
            return self._debugger.guest.os().symbol_elf
        return b""  # cmdline, environ: a machine has none

    def _process_file(self, pid: int, name: str) -> bytes | None:
        if name != "maps":
            return None
        process = self._debugger.guest.os().find_process(pid)
        if process is None:
            return None
        if process.cr3 is None:
            return b""
        mode, pages = self._debugger.mappings(self._current_cpu(), process.cr3)
        return maps_text(mode, [page for page in pages if page.user]).encode()
