"""The symbol file GDB loads for a Linux guest: every kernel and module symbol at its running
address, in an ELF with no contents (GDB reads code from the target). See `elf` for the format."""

from __future__ import annotations

import logging

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.elf import ElfSection, build_symbol_elf, sizes_from_addresses
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.modules import module_symbols, modules

log = logging.getLogger("vmigdb.guest.linux")

# (section, first symbol, end symbol, flags): the kernel image's own layout, from its linker script.
_SECTIONS = (
    (".text", "_text", "_etext", "ax"),
    (".rodata", "__start_rodata", "__end_rodata", "a"),
    (".data", "_sdata", "_edata", "wa"),
    (".init", "__init_begin", "__init_end", "wax"),
    (".bss", "__bss_start", "__bss_stop", "wa"),
)


def exec_file_name(guest: LinuxGuest) -> str:
    """The name GDB is given for the symbol file: its release, under a directory no host has."""
    return f"/vmigdb/vmlinux-{guest.kernel.release}"


def symbol_elf(guest: LinuxGuest) -> bytes:
    """``bytes symbol_elf(LinuxGuest guest)``: kallsyms' symbols, then the loaded modules'."""
    sections = []
    for name, first, end, flags in _SECTIONS:
        start, stop = guest.symbols.lookup(first), guest.symbols.lookup(end)
        if start is not None and stop is not None and stop.address > start.address:
            sections.append(ElfSection(name, start.address, stop.address - start.address, flags))
    triples = [(s.name, s.address, s.type) for s in guest.symbols if s.type not in "aA"]
    triples += _module_symbols(guest, sections)
    return build_symbol_elf(sizes_from_addresses(triples), sections)


def _module_symbols(guest: LinuxGuest, sections: list[ElfSection]) -> list[tuple[str, int, str]]:
    """Loaded modules' symbols (best effort: a module being loaded may not be readable yet),
    each module's core as a section of its own."""
    found: list[tuple[str, int, str]] = []
    try:
        loaded = modules(guest)
    except GuestError as exc:
        log.info("no module symbols: %s", exc)
        return found
    for module in loaded:
        try:
            symbols = module_symbols(guest, module)
        except GuestError as exc:
            log.info("no symbols for module %s: %s", module.name, exc)
            continue
        sections.append(ElfSection(f".module.{module.name}", module.base, module.size, "ax"))
        found += symbols
    return found
