"""Everything vmigdb knows about a running Linux guest, read out of its memory (never written).

`LinuxGuest.attach` finds the kernel and its KASLR offsets (VMCOREINFO in RAM), decodes kallsyms,
and reads BTF on first use: no profile, no System.map, no vmlinux. It is the "program" the helpers
take (`tasks`, `modules`, `symbol_file`), as drgn's helpers take a `Program`; `LinuxOS` puts them
behind the OS-awareness interface.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property

from vmigdb.guest.linux.btf import Btf, BtfError, btf_from_memory
from vmigdb.guest.linux.identify import find_kernel
from vmigdb.guest.linux.kallsyms import SymbolTable, read_kallsyms
from vmigdb.guest.linux.kernel import KernelMemory, LinuxKernel, ReadPhys

log = logging.getLogger("vmigdb.guest.linux")


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
        start = self.symbols.lookup("__start_BTF")
        stop = self.symbols.lookup("__stop_BTF")
        if start is None or stop is None:
            raise BtfError("the kernel has no __start_BTF/__stop_BTF (CONFIG_DEBUG_INFO_BTF=n?)")
        return btf_from_memory(self.memory.read, start.address, stop.address)
