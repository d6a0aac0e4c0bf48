"""The symbol files of a Linux guest: every kernel and module symbol at its running address, in
ELFs with no contents (GDB reads code from the target). See `elf` for the format.

`symbol_elf` has the kernel and every loaded module, for tools that take one file (`vmigdb
symbols`). GDB gets the kernel image alone as its executable (`kernel_elf`) and each module as a
shared library of its own (`module_elf`, listed by ``qXfer:libraries-svr4:read``), so that a
module loaded later is one GDB learns about at the next stop that says the list changed."""

from __future__ import annotations

import logging

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.elf import ElfSection, build_symbol_elf, sizes_from_addresses
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.modules import Module, module_init_region, module_symbols, modules

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


def _kernel(guest: LinuxGuest) -> tuple[list[tuple[str, int, str]], list[ElfSection]]:
    sections = []
    for name, first, end, flags in _SECTIONS:
        start, stop = guest.symbols.lookup(first), guest.symbols.lookup(end)
        if start is not None and stop is not None and stop.address > start.address:
            sections.append(ElfSection(name, start.address, stop.address - start.address, flags))
    triples = [(s.name, s.address, s.type) for s in guest.symbols if s.type not in "aA"]
    return triples, sections


def symbol_elf(guest: LinuxGuest) -> bytes:
    """``bytes symbol_elf(LinuxGuest guest)``: kallsyms' symbols, then the loaded modules'."""
    triples, sections = _kernel(guest)
    triples += _module_symbols(guest, sections)
    return build_symbol_elf(sizes_from_addresses(triples), sections)


def kernel_elf(guest: LinuxGuest) -> bytes:
    """``bytes kernel_elf(LinuxGuest guest)``: kallsyms' symbols alone (the kernel image)."""
    triples, sections = _kernel(guest)
    return build_symbol_elf(sizes_from_addresses(triples), sections)


def module_elf(guest: LinuxGuest, module: Module) -> bytes:
    """``bytes module_elf(LinuxGuest guest, Module module)``: one module's symbols, its core and
    (while it still has one) its init memory as sections.

    :raises GuestError: if its symbol table cannot be read
    """
    sections = [ElfSection(".text", module.base, module.size, "ax")]
    init_base, init_size = module_init_region(guest, module)
    if init_base and init_size:
        sections.append(ElfSection(".init.text", init_base, init_size, "ax"))
    return build_symbol_elf(sizes_from_addresses(module_symbols(guest, module)), sections)


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
