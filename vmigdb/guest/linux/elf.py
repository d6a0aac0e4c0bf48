"""A symbols-only ELF of the running kernel, built in memory, for GDB to load as the exec file.

vmigdb decodes the guest kernel's symbol table (kallsyms) from guest memory; `build_symbol_elf`
turns it into a small ELF that GDB fetches with ``qXfer:exec-file:read`` and ``vFile:*`` (and
that LLDB, IDA or Ghidra can open as a file), so ``info symbol $pc``, ``break NAME``, ``bt`` and
``x/i`` with ``<name+off>`` work with no command typed.

The file holds no code or data: an ELF64 x86-64 ``ET_EXEC`` (so GDB relocates nothing and the
symbols sit at their real, KASLR-shifted addresses), ``e_entry`` 0, with section headers null,
one ``SHT_NOBITS`` section per kernel section (address and size only: GDB learns which addresses
are code and which data), ``.symtab``, ``.strtab`` and ``.shstrtab``, and one ``PT_LOAD`` with
``p_filesz`` 0 per allocated kernel section, for tools that go by segments.

What GDB 13 does with it (``tests/unit/test_elf.py`` checks this file's behaviour with GDB
itself; the alternatives named below were tried by hand):

* Connected with ``target remote``, GDB reads all memory from the stub, inside the sections
  too: the remote target "has all memory", so GDB never falls back to the file, and an address
  the stub cannot read is "Cannot access memory", not zeros. The one exception is
  ``set trust-readonly-sections on`` (off by default): GDB then reads sections without ``w``
  from the file, as zeros. It is wrong for a kernel anyway, which patches its own text.
* With no target at all (the file opened alone), GDB shows the sections as zeros: BFD serves
  the contents of an allocated section without file data as zeros and GDB's exec target asks no
  further. That cannot be helped without breaking the file: without ``SHF_ALLOC`` GDB 13 drops
  the sections' symbols (and crashes on ``break``); ``SHT_PROGBITS`` pointing past the end of the
  file makes reads fail but GDB warns about it on every load.
* GDB takes symbol sizes seriously: a PC beyond ``value + size`` of the nearest symbol below is
  "No symbol matches" (a symbol of size 0 reaches to the next one), so a size is clipped to
  the end of the symbol's section. Absolute symbols (``SHN_ABS``, e.g. per-CPU offsets) have an
  address for ``info address`` but label no address.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_SYMBOL_SIZE",
    "ElfSection",
    "ElfSymbol",
    "build_symbol_elf",
    "kind_for_type",
    "sizes_from_addresses",
]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM_SIZE = 24  # Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value, st_size

_ELF_IDENT = b"\x7fELF" + bytes([2, 1, 1])  # ELFCLASS64, ELFDATA2LSB, EV_CURRENT; ELFOSABI_NONE
_ET_EXEC = 2
_EM_X86_64 = 62
_EV_CURRENT = 1

_PT_LOAD = 1
_PF_X, _PF_W, _PF_R = 1, 2, 4

_SHT_PROGBITS = 1
_SHT_SYMTAB = 2
_SHT_STRTAB = 3
_SHT_NOBITS = 8
_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR = 0x1, 0x2, 0x4
_SECTION_FLAGS = {"w": _SHF_WRITE, "a": _SHF_ALLOC, "x": _SHF_EXECINSTR}

_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
_STT_NOTYPE, _STT_OBJECT, _STT_FUNC = 0, 1, 2
_KINDS = {"notype": _STT_NOTYPE, "object": _STT_OBJECT, "func": _STT_FUNC}
_BINDINGS = {"local": _STB_LOCAL, "global": _STB_GLOBAL, "weak": _STB_WEAK}
_UNSET = -1
_BINDING_OR_UNSET: dict[str | None, int] = {**_BINDINGS, None: _UNSET}
_SHN_ABS = 0xFFF1

_MASK64 = (1 << 64) - 1

#: Largest size `sizes_from_addresses` gives a symbol: a larger gap to the next symbol means the
#: symbol is the last of its region (the end of .text, say), not a 1 MiB function.
MAX_SYMBOL_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class ElfSymbol:
    """One symbol. ``kind``: ``"func"``, ``"object"`` or ``"notype"``.

    ``binding``: ``"local"``, ``"global"`` or ``"weak"``; None leaves it to `build_symbol_elf`'s
    ``global_names``.
    """

    name: str
    address: int
    size: int
    kind: str
    binding: str | None = None


@dataclass(frozen=True, slots=True)
class ElfSection:
    """One section, described but not contained. ``flags``: letters of ``"awx"``.

    ``data``: contents to carry after all (``SHT_PROGBITS``), for the few sections a debugger
    reads from the file rather than the target, such as ``.eh_frame`` (call-frame information:
    GDB unwinds with it); None for the usual ``SHT_NOBITS`` description.
    """

    name: str
    address: int
    size: int
    flags: str
    data: bytes | None = None


def kind_for_type(type_letter: str) -> tuple[str, str]:
    """``(kind, binding)`` for a kallsyms (nm) type letter: ``"T"`` -> ``("func", "global")``.

    T t W w are functions; D d B b R r V v objects; anything else (A, ?, ...) has no type.
    Uppercase is global and lowercase local, except that W w V v are weak.
    """
    upper = type_letter.upper()
    if upper in ("T", "W"):
        kind = "func"
    elif upper in ("D", "B", "R", "V"):
        kind = "object"
    else:
        kind = "notype"
    if upper in ("W", "V"):
        return kind, "weak"
    return kind, "global" if type_letter.isupper() else "local"


def sizes_from_addresses(
    symbols: list[tuple[str, int, str]], *, max_size: int = MAX_SYMBOL_SIZE
) -> list[ElfSymbol]:
    """ElfSymbols, sizes guessed, for kallsyms' ``(name, address, type_letter)`` triples.

    kallsyms records no sizes: a symbol's size is the distance from its address to the next
    higher address among all the symbols (aliases at one address get the same size), or 0 at the
    highest address and when that distance exceeds ``max_size``. Kind and binding come from the
    type letter (`kind_for_type`). The result is in the input order.
    """
    addresses = sorted({address for _, address, _ in symbols})
    sizes = {
        here: gap if (gap := following - here) <= max_size else 0
        for here, following in zip(addresses, addresses[1:], strict=False)
    }
    if addresses:
        sizes[addresses[-1]] = 0
    kinds = {letter: kind_for_type(letter) for letter in {letter for _, _, letter in symbols}}
    return [
        ElfSymbol(name, address, sizes[address], *kinds[letter])
        for name, address, letter in symbols
    ]


def _section_flags(flags: str) -> int:
    value = 0
    for char in flags:
        try:
            value |= _SECTION_FLAGS[char]
        except KeyError:
            raise ValueError(f"unknown section flag {char!r} in {flags!r}") from None
    return value


def _align(offset: int, alignment: int = 8) -> int:
    return (offset + alignment - 1) & -alignment


def _symtab(
    symbols: Iterable[ElfSymbol], sections: list[ElfSection], global_names: set[str] | None
) -> tuple[bytes, bytes, int]:
    """``(.symtab, .strtab, number of local symbols including the null one)``."""
    # Which section holds an address: sorted by (start, size) so that of sections starting at one
    # address the largest wins; empty and non-allocated sections hold nothing.
    lookup = sorted(
        (s.address & _MASK64, s.size, index)
        for index, s in enumerate(sections, 1)
        if s.size > 0 and "a" in s.flags
    )
    starts = [start for start, _, _ in lookup]
    ends = [start + size for start, size, _ in lookup]
    indexes = [index for _, _, index in lookup]

    # Column by column, each a list comprehension: twice as fast as one loop building tuples.
    syms = list(symbols)
    binds = [_BINDING_OR_UNSET[s.binding] for s in syms]
    if _UNSET in binds:
        if global_names is None:
            binds = [_STB_GLOBAL if b == _UNSET else b for b in binds]
        else:
            binds = [
                b if b != _UNSET else _STB_GLOBAL if s.name in global_names else _STB_LOCAL
                for s, b in zip(syms, binds, strict=True)
            ]
    local_count = binds.count(_STB_LOCAL)
    if 0 < local_count < len(syms):  # locals first, each group in the given order
        syms = [s for s, b in zip(syms, binds, strict=True) if b == _STB_LOCAL] + [
            s for s, b in zip(syms, binds, strict=True) if b != _STB_LOCAL
        ]
        binds = [_STB_LOCAL] * local_count + [b for b in binds if b != _STB_LOCAL]
    if not syms:
        return bytes(_SYM_SIZE), b"\0", 1

    addresses = [s.address & _MASK64 for s in syms]
    bisect_right = bisect.bisect_right
    positions = [bisect_right(starts, address) - 1 for address in addresses]
    shndxs = [
        indexes[i] if i >= 0 and address < ends[i] else _SHN_ABS
        for i, address in zip(positions, addresses, strict=True)
    ]
    sizes = [
        end - address if shndx != _SHN_ABS and address + s.size > (end := ends[i]) else s.size
        for s, i, address, shndx in zip(syms, positions, addresses, shndxs, strict=True)
    ]
    encoded = [s.name.encode() for s in syms]
    strtab = b"\0" + b"\0".join(encoded) + b"\0"
    if strtab.count(0) != len(syms) + 1:
        raise ValueError("a symbol name contains a NUL byte")
    name_offsets = itertools.accumulate([len(e) + 1 for e in encoded], initial=1)
    # The first quadword of an Elf64_Sym: st_name | st_info << 32 | st_other << 40 | st_shndx << 48.
    words = [
        offset | ((bind << 4 | _KINDS[s.kind]) << 32) | shndx << 48
        for offset, bind, s, shndx in zip(name_offsets, binds, syms, shndxs, strict=False)
    ]
    # Three quadwords per symbol, the first row (index 0) the null symbol; strided assignment
    # interleaves the columns at C speed.
    table = array("Q", bytes(_SYM_SIZE * (len(syms) + 1)))
    table[3::3] = array("Q", words)
    table[4::3] = array("Q", addresses)
    table[5::3] = array("Q", sizes)
    if sys.byteorder == "big":
        table.byteswap()
    return table.tobytes(), strtab, local_count + 1


def build_symbol_elf(
    symbols: Iterable[ElfSymbol],
    sections: Iterable[ElfSection],
    *,
    global_names: set[str] | None = None,
) -> bytes:
    """The bytes of a symbols-only ELF64 x86-64 ``ET_EXEC`` file (see the module docstring).

    A symbol's binding is its own ``binding`` if set, else global when ``global_names`` is None or
    holds its name, else local. ``st_shndx`` is the allocated section containing the address
    (``SHN_ABS`` if none) and the size is clipped to that section's end. Locals come first in
    ``.symtab`` (``sh_info`` = index of the first global), as ELF requires; repeated names are
    all kept, in their given order within each binding.
    """
    sections = list(sections)
    flags = [_section_flags(s.flags) for s in sections]
    for s in sections:
        if s.name in ("", ".symtab", ".strtab", ".shstrtab"):
            raise ValueError(f"section name {s.name!r} is reserved")
        if s.size < 0 or not 0 <= s.address <= _MASK64:
            raise ValueError(f"bad section {s}")
    symtab, strtab, first_global = _symtab(symbols, sections, global_names)

    shstrtab = bytearray(b"\0")
    name_offsets = []
    for name in [s.name for s in sections] + [".symtab", ".strtab", ".shstrtab"]:
        name_offsets.append(len(shstrtab))
        shstrtab += name.encode() + b"\0"

    # PT_LOAD entries must ascend by address.
    loadable = sorted(
        (s for s, f in zip(sections, flags, strict=True) if f & _SHF_ALLOC and s.size),
        key=lambda s: s.address,
    )

    # Layout: ELF header, program headers, .symtab, .strtab, .shstrtab, the sections carrying
    # data, section headers.
    phoff = _EHDR.size if loadable else 0
    symtab_off = _align(_EHDR.size + len(loadable) * _PHDR.size)
    strtab_off = symtab_off + len(symtab)
    shstrtab_off = strtab_off + len(strtab)
    data_offsets: list[int] = []
    end = shstrtab_off + len(shstrtab)
    for section in sections:
        if section.data is not None:
            end = _align(end)
            data_offsets.append(end)
            end += len(section.data)
        else:
            data_offsets.append(symtab_off)
    shoff = _align(end)
    shnum = len(sections) + 4

    out = bytearray(
        _EHDR.pack(
            _ELF_IDENT, _ET_EXEC, _EM_X86_64, _EV_CURRENT, 0, phoff, shoff, 0, _EHDR.size,
            _PHDR.size if loadable else 0, len(loadable), _SHDR.size, shnum, shnum - 1,
        )
    )  # fmt: skip
    file_offsets = {id(s): o for s, o in zip(sections, data_offsets, strict=True) if s.data}
    for s in loadable:
        f = _section_flags(s.flags)
        pflags = _PF_R | (_PF_W if f & _SHF_WRITE else 0) | (_PF_X if f & _SHF_EXECINSTR else 0)
        offset, filesz = file_offsets.get(id(s), 0), len(s.data or b"")
        out += _PHDR.pack(_PT_LOAD, pflags, offset, s.address, s.address, filesz, s.size, 1)
    out += bytes(symtab_off - len(out))
    out += symtab
    out += strtab
    out += shstrtab
    for section, offset in zip(sections, data_offsets, strict=True):
        if section.data is not None:
            out += bytes(offset - len(out)) + section.data
    out += bytes(shoff - len(out))

    out += bytes(_SHDR.size)
    for s, f, name, offset in zip(sections, flags, name_offsets, data_offsets, strict=False):
        alignment = min(s.address & -s.address, 4096) if s.address else 4096
        kind = _SHT_NOBITS if s.data is None else _SHT_PROGBITS
        size = s.size if s.data is None else len(s.data)
        out += _SHDR.pack(name, kind, f, s.address, offset, size, 0, 0, alignment, 0)
    symtab_name, strtab_name, shstrtab_name = name_offsets[-3:]
    out += _SHDR.pack(
        symtab_name, _SHT_SYMTAB, 0, 0, symtab_off, len(symtab),
        len(sections) + 2, first_global, 8, _SYM_SIZE,
    )  # fmt: skip
    out += _SHDR.pack(strtab_name, _SHT_STRTAB, 0, 0, strtab_off, len(strtab), 0, 0, 1, 0)
    out += _SHDR.pack(shstrtab_name, _SHT_STRTAB, 0, 0, shstrtab_off, len(shstrtab), 0, 0, 1, 0)
    return bytes(out)
