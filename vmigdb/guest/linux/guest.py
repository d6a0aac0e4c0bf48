"""Everything vmigdb knows about a running Linux guest, read out of its memory (never written).

`LinuxGuest.attach` finds the kernel and its KASLR offsets (VMCOREINFO in RAM), decodes kallsyms,
and reads BTF on first use: no profile, no System.map, no vmlinux. The symbol ELF served to GDB is
built from the same symbols, at their real (KASLR-shifted) addresses.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property

from vmigdb.guest.linux import modules
from vmigdb.guest.linux.btf import Btf, btf_from_memory
from vmigdb.guest.linux.elf import ElfSection, build_symbol_elf, sizes_from_addresses
from vmigdb.guest.linux.kallsyms import SymbolTable, read_kallsyms
from vmigdb.guest.linux.kernel import KernelMemory, LinuxKernel, ReadPhys, find_kernel

log = logging.getLogger("vmigdb.guest.linux")

# (section, first symbol, end symbol, flags): the kernel image's own layout, from its linker script.
_SECTIONS = (
    (".text", "_text", "_etext", "ax"),
    (".rodata", "__start_rodata", "__end_rodata", "a"),
    (".data", "_sdata", "_edata", "wa"),
    (".init", "__init_begin", "__init_end", "wax"),
    (".bss", "__bss_start", "__bss_stop", "wa"),
)


class LinuxGuest:
    def __init__(self, kernel: LinuxKernel, memory: KernelMemory, symbols: SymbolTable) -> None:
        self.kernel = kernel
        self.memory = memory
        self.symbols = symbols

    @classmethod
    def attach(cls, read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]) -> LinuxGuest:
        """:raises KernelNotFound, KallsymsNotFound: with a one-line reason."""
        start = time.perf_counter()
        kernel = find_kernel(read_phys, ram_ranges)
        memory = KernelMemory(read_phys, kernel)
        symbols = SymbolTable(read_kallsyms(memory, kernel))
        log.info(
            "Linux %s, KASLR offset %#x, %d symbols (%.2f s)",
            kernel.release,
            kernel.kaslr_offset,
            len(symbols),
            time.perf_counter() - start,
        )
        return cls(kernel, memory, symbols)

    def refresh(self) -> None:
        """The guest ran: forget cached reads of kernel memory."""
        self.memory.flush()

    @cached_property
    def btf(self) -> Btf:
        """The kernel's BTF (struct layouts), read from between __start_BTF and __stop_BTF.

        :raises BtfError: if the kernel has none (CONFIG_DEBUG_INFO_BTF=n) or it is unreadable
        """
        start = self.symbols.address("__start_BTF")
        stop = self.symbols.address("__stop_BTF")
        return btf_from_memory(self.memory.read, start, stop)

    @property
    def exec_file_name(self) -> str:
        return f"/vmigdb/vmlinux-{self.kernel.release}"

    @cached_property
    def symbol_elf(self) -> bytes:
        """An ELF with every kernel symbol at its running address and no contents (GDB reads code
        from the target)."""
        sections = []
        for name, first, end, flags in _SECTIONS:
            start, stop = self.symbols.lookup(first), self.symbols.lookup(end)
            if start is not None and stop is not None and stop.address > start.address:
                sections.append(
                    ElfSection(name, start.address, stop.address - start.address, flags)
                )
        triples = [(s.name, s.address, s.type) for s in self.symbols if s.type not in "aA"]
        triples += self._module_symbols(sections)
        return build_symbol_elf(sizes_from_addresses(triples), sections)

    def _module_symbols(self, sections: list[ElfSection]) -> list[tuple[str, int, str]]:
        """Loaded modules' symbols (best effort: a module being loaded may not be readable yet),
        each module's core as a section of its own."""
        found: list[tuple[str, int, str]] = []
        try:
            loaded = modules.modules(self)
        except (modules.GuestError, modules.BtfError, modules.FaultError) as exc:
            log.info("no module symbols: %s", exc)
            return found
        for module in loaded:
            try:
                symbols = modules.module_symbols(self, module)
            except (modules.GuestError, modules.FaultError) as exc:
                log.info("no symbols for module %s: %s", module.name, exc)
                continue
            sections.append(ElfSection(f".module.{module.name}", module.base, module.size, "ax"))
            found += symbols
        return found
