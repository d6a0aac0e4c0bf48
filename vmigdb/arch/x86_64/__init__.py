"""x86-64 specifics: the register file GDB sees and guest page-table walks."""

from vmigdb.arch.x86_64.paging import (
    Fault,
    PagingMode,
    PhysicalMemoryError,
    ReadPhys,
    Translation,
    Translator,
    paging_mode,
    translate,
    translate_range,
)
from vmigdb.arch.x86_64.registers import (
    G_PACKET_SIZE,
    REGISTER_INDEX,
    REGISTERS,
    Register,
    RegisterFile,
    split_g,
)

__all__ = [
    "G_PACKET_SIZE",
    "REGISTERS",
    "REGISTER_INDEX",
    "Fault",
    "PagingMode",
    "PhysicalMemoryError",
    "ReadPhys",
    "Register",
    "RegisterFile",
    "Translation",
    "Translator",
    "paging_mode",
    "split_g",
    "translate",
    "translate_range",
]
