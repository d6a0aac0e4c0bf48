"""What GDB lists as shared libraries: the scoped process's mapped objects, or the kernel's modules.

With a process in scope GDB's ``info sharedlibrary`` shows the program and every shared object it
has mapped (and its vDSO); in kernel scope, every loaded module. Each comes with a symbols-only
ELF rebuilt from guest memory (`GuestOS.library_elf`), which GDB fetches with ``vFile`` under the
name listed, so exported functions resolve by name (``break puts``, ``x/i malloc``).

GDB 13 tells two libraries apart by name alone (``svr4_same``): the same path in two processes,
or after an exec, would keep the symbols of the first instance at its old address. So every name
carries the load address (``/lib/x86_64-linux-gnu/libc.so.6@0x7f3a12c00000``): a new instance is
a new name, and GDB drops the old one and loads the new. The addresses in the ELFs are absolute,
so each library's load bias (``l_addr``) is 0.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from vmigdb.debugger.guest_view import ANALYSIS_ERRORS, GuestUnavailable, GuestView
from vmigdb.debugger.scope import ScopeWatch
from vmigdb.guest.base import Library

log = logging.getLogger("vmigdb.debugger")

MODULE_DIR = "/vmigdb/modules"
PSEUDO_DIR = "/vmigdb"  # for objects with no file ([vdso])
_CACHE_SIZE = 64


@dataclass(frozen=True, slots=True)
class ServedLibrary:
    """One entry of the list GDB gets: its unique `name`, what it is, and whose (None: kernel)."""

    name: str
    library: Library
    pid: int | None


def served_name(library: Library, pid: int | None) -> str:
    if pid is None:
        return f"{MODULE_DIR}/{library.path}.ko@{library.base:#x}"
    path = library.path if library.path.startswith("/") else f"{PSEUDO_DIR}/{library.path}"
    return f"{path}@{library.base:#x}"


class LibraryList:
    def __init__(self, guest: GuestView, scope: ScopeWatch) -> None:
        self._guest = guest
        self._scope = scope
        self._served: dict[str, ServedLibrary] = {}
        self._elves: OrderedDict[tuple[object, ...], bytes] = OrderedDict()

    def current(self) -> list[ServedLibrary]:
        """The list for the scope now (empty when the guest cannot be analysed or read)."""
        scope = self._scope.current
        pid = scope.pid if scope is not None else None
        try:
            found = self._guest.os().libraries(pid)
        except GuestUnavailable:
            return []
        except ANALYSIS_ERRORS as exc:
            log.info("no library list for %s: %s", f"process {pid}" if pid else "the kernel", exc)
            return []
        served = [ServedLibrary(served_name(lib, pid), lib, pid) for lib in found]
        self._served.update((s.name, s) for s in served)
        return served

    def svr4_xml(self) -> bytes:
        """GDB's ``qXfer:libraries-svr4:read`` document for the scope."""
        rows = [
            f'  <library name={quoteattr(s.name)} lm="0x0" l_addr="0x0" l_ld="0x0" lmid="0x0"/>\n'
            for s in self.current()
        ]
        return (
            '<?xml version="1.0"?>\n<library-list-svr4 version="1.0">\n'
            + "".join(rows)
            + "</library-list-svr4>\n"
        ).encode()

    def file(self, name: str) -> bytes | None:
        """The ELF GDB opens for a name it was listed (None: no such library)."""
        served = self._served.get(name)
        if served is None:
            return None
        key = (served.pid is None, served.library.path, *served.library.key)
        data = self._elves.get(key)
        if data is not None:
            self._elves.move_to_end(key)
            return data
        try:
            data = self._guest.os().library_elf(served.pid, served.library)
        except (GuestUnavailable, *ANALYSIS_ERRORS) as exc:
            log.warning("no symbols for %s: %s", served.name, exc)
            return None
        self._elves[key] = data
        while len(self._elves) > _CACHE_SIZE:
            self._elves.popitem(last=False)
        return data
