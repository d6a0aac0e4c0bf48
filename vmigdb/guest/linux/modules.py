"""Loaded kernel modules and their symbols, read out of guest memory (never written).

``modules`` (kernel/module/main.c) heads the list of every ``struct module``, linked through
``module.list``. Offsets come from BTF, so the layout drift between kernels is handled here:

- since Linux kernel commit ac3b43283923 ("module: replace module_layout with module_memory")
  (in v6.4), a module's memory is ``mem[MOD_TEXT]``, ``mem[MOD_DATA]``, ...; its text is
  ``mem[MOD_TEXT].base`` / ``.size``;
- from commit 7523e4dc5057 ("module: use a structure to encapsulate layout.") (in v4.5) until
  then, ``core_layout.base`` / ``.size`` (text, read-only data and data together);
- before v4.5, ``module_core`` / ``core_size``.

A module's symbols are the ELF symbol table the loader kept (``mod->kallsyms``, a
``struct mod_kallsyms`` since commit 8244062ef1e5 ("modules: fix longstanding /proc/kallsyms vs
module insertion race.") in v4.5, the fields on ``struct module`` itself before), the same table
``/proc/kallsyms`` lists module symbols from.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.btf import BtfError
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.kernel import FaultError
from vmigdb.guest.linux.structs import (
    MAX_LIST_ENTRIES,
    field_offset,
    field_size,
    guest_btf,
    symbol_address,
)

__all__ = ["Module", "find_module", "module_init_region", "module_symbols", "modules"]

_KERNEL_HALF = 1 << 63
_CACHE_KEY = "modules.layout"
# Elf64_Sym (the ELF specification, include/uapi/linux/elf.h): st_name u32, st_info u8,
# st_other u8, st_shndx u16, st_value u64, st_size u64.
_ELF64_SYM = struct.Struct("<IBBHQQ")
_MAX_SYMBOLS = 1 << 20  # more than any module has; a bigger num_symtab is garbage
KSYM_NAME_LEN = 512  # v6.1 commit b8a94bfb3395 raised it from 128


@dataclass(frozen=True, slots=True)
class Module:
    """One loaded module.

    :ivar name: ``mod->name``, e.g. ``"virtio_net"``.
    :ivar address: ``struct module *``.
    :ivar base: Start of its text: ``mem[MOD_TEXT].base`` (v6.4+) or ``core_layout.base``.
    :ivar size: Bytes there: ``mem[MOD_TEXT].size`` (text only) since v6.4; before,
        ``core_layout.size`` (text, read-only data and data).
    """

    name: str
    address: int
    base: int
    size: int


@dataclass(frozen=True, slots=True)
class _Layout:
    list: int
    name: int
    name_len: int
    base: int
    size: int
    size_len: int
    state: int | None
    unformed: int | None  # MODULE_STATE_UNFORMED: on the list but not loaded yet
    kallsyms: int | None  # module.kallsyms (struct mod_kallsyms *), v4.5+
    symtab: int  # offsets in struct mod_kallsyms, or in struct module before v4.5
    num_symtab: int
    strtab: int
    typetab: int | None  # v5.2+


def _layout(guest: LinuxGuest) -> _Layout:
    cached = guest.memory.cache.get(_CACHE_KEY)
    if cached is not None:
        return cached
    btf = guest_btf(guest)
    if btf.has_member("module", "mem"):
        try:
            text = btf.enumerators("mod_mem_type").get("MOD_TEXT", 0)
            stride = btf.size_of("module_memory")
        except BtfError:
            raise GuestError("BTF has no enum mod_mem_type or struct module_memory") from None
        mem = field_offset(btf, "module", "mem") + text * stride
        base = mem + field_offset(btf, "module_memory", "base")
        size = mem + field_offset(btf, "module_memory", "size")
        size_len = field_size(btf, "module_memory", "size")
    elif btf.has_member("module", "core_layout"):
        base = field_offset(btf, "module", "core_layout.base")
        size = field_offset(btf, "module", "core_layout.size")
        size_len = field_size(btf, "module", "core_layout.size")
    elif btf.has_member("module", "module_core"):
        base = field_offset(btf, "module", "module_core")
        size = field_offset(btf, "module", "core_size")
        size_len = field_size(btf, "module", "core_size")
    else:
        raise GuestError("BTF has no field module.mem, module.core_layout or module.module_core")
    state = unformed = None
    if btf.has_member("module", "state"):
        state = field_offset(btf, "module", "state")
        try:
            unformed = btf.enumerators("module_state").get("MODULE_STATE_UNFORMED")
        except BtfError:
            unformed = None
    # Since Linux kernel commit 1c7651f43777 ("kallsyms: store type information in its own
    # array") (in v5.2) the nm letters are mod_kallsyms.typetab; before, they overwrote st_info
    # (st_size in v5.0 and v5.1, commit 5439c985c5a8, which is not told apart here).
    if btf.has_member("module", "kallsyms"):
        kallsyms, ks = field_offset(btf, "module", "kallsyms"), "mod_kallsyms"
    else:
        kallsyms, ks = None, "module"
    typetab = field_offset(btf, ks, "typetab") if btf.has_member(ks, "typetab") else None
    layout = _Layout(
        list=field_offset(btf, "module", "list"),
        name=field_offset(btf, "module", "name"),
        name_len=field_size(btf, "module", "name"),
        base=base,
        size=size,
        size_len=size_len,
        state=state,
        unformed=unformed,
        kallsyms=kallsyms,
        symtab=field_offset(btf, ks, "symtab"),
        num_symtab=field_offset(btf, ks, "num_symtab"),
        strtab=field_offset(btf, ks, "strtab"),
        typetab=typetab,
    )
    guest.memory.cache[_CACHE_KEY] = layout
    return layout


def modules(guest: LinuxGuest) -> list[Module]:
    """Every loaded module, in the kernel's list order (newest first, like ``lsmod``).

    Modules still being set up (``MODULE_STATE_UNFORMED``) are left out, as /proc/modules does.

    :raises GuestError: if BTF lacks a ``struct module`` field, there is no ``modules`` symbol
        (CONFIG_MODULES=n), or the list is corrupted
    :raises FaultError: if a list entry cannot be read
    """
    layout = _layout(guest)
    mem = guest.memory
    head = symbol_address(guest, "modules")
    out: list[Module] = []
    node = mem.u64(head)
    for _ in range(MAX_LIST_ENTRIES):
        if node == head:
            return out
        if not node & _KERNEL_HALF or node & 7:
            raise GuestError(f"modules: list pointer {node:#x} is not a kernel address")
        address = node - layout.list
        next_node = mem.u64(node)
        if layout.state is not None and layout.unformed is not None:
            if mem.u32(address + layout.state) == layout.unformed:
                node = next_node
                continue
        raw = mem.read(address + layout.name, layout.name_len)
        out.append(
            Module(
                name=raw.split(b"\0", 1)[0].decode("utf-8", "replace"),
                address=address,
                base=mem.u64(address + layout.base),
                size=int.from_bytes(mem.read(address + layout.size, layout.size_len), "little"),
            )
        )
        node = next_node
    raise GuestError(f"modules: more than {MAX_LIST_ENTRIES} entries (corrupted list?)")


def find_module(guest: LinuxGuest, name: str) -> Module | None:
    """The loaded module called *name*, or None. :raises: as `modules`."""
    return next((m for m in modules(guest) if m.name == name), None)


def _strings(guest: LinuxGuest, strtab: int, offsets: list[int]) -> dict[int, str]:
    """Names at each offset into *strtab*: one read of the whole table when possible."""
    if not offsets:
        return {}
    mem = guest.memory
    last = max(offsets)
    try:
        blob = mem.read(strtab, last) + mem.string(strtab + last, KSYM_NAME_LEN).encode() + b"\0"
    except FaultError:
        blob = b""
    out = {}
    for offset in offsets:
        if blob:
            end = blob.find(b"\0", offset)
            out[offset] = blob[offset:end].decode("utf-8", "replace")
        else:
            try:
                out[offset] = mem.string(strtab + offset, KSYM_NAME_LEN)
            except FaultError:
                out[offset] = ""
    return out


def module_symbols(guest: LinuxGuest, module: Module) -> list[tuple[str, int, str]]:
    """A module's symbols as ``(name, address, nm type letter)``, in its symbol-table order.

    Best effort: the table is what the loader kept for kallsyms (core symbols once the module's
    init has run, all of them during init); nameless entries are skipped. Before v5.2 the type
    letter is read from ``st_info``, where the kernel then stored it.

    :raises GuestError: if BTF lacks the ``mod_kallsyms`` fields, or the table's size is absurd
    :raises FaultError: if the table cannot be read
    """
    layout = _layout(guest)
    mem = guest.memory
    ks = module.address
    if layout.kallsyms is not None:
        ks = mem.u64(module.address + layout.kallsyms)
        if not ks:
            return []
    count = mem.u32(ks + layout.num_symtab)  # unsigned int in every version
    if count > _MAX_SYMBOLS:
        raise GuestError(f"module {module.name}: {count} symbols is not plausible")
    if not count:
        return []
    symtab = mem.u64(ks + layout.symtab)
    strtab = mem.u64(ks + layout.strtab)
    raw = mem.read(symtab, count * _ELF64_SYM.size)
    entries = list(_ELF64_SYM.iter_unpack(raw))
    if layout.typetab is not None:
        types = mem.read(mem.u64(ks + layout.typetab), count)
    else:
        types = bytes(e[1] for e in entries)  # st_info held the letter
    names = _strings(guest, strtab, sorted({e[0] for e in entries if e[0]}))
    out = []
    for i, (st_name, _info, _other, _shndx, st_value, _size) in enumerate(entries):
        name = names.get(st_name, "") if st_name else ""
        if not name:
            continue
        letter = chr(types[i]) if 0x20 < types[i] < 0x7F else "?"
        out.append((name, st_value, letter))
    return out


def module_init_region(guest: LinuxGuest, module: Module) -> tuple[int, int]:
    """``(base, size)`` of a module's init memory (text and data of its ``__init`` code), which
    the kernel frees once the init function has returned: ``(0, 0)`` then, or when unknown.

    ``mem[MOD_INIT_TEXT]`` since v6.4, ``init_layout`` from v4.5, ``module_init``/``init_size``
    before (see the module docstring for the commits).

    :raises FaultError: if the module cannot be read
    """
    btf = guest_btf(guest)
    try:
        if btf.has_member("module", "mem"):
            index = btf.enumerators("mod_mem_type").get("MOD_INIT_TEXT")
            if index is None:
                return 0, 0
            mem = field_offset(btf, "module", "mem") + index * btf.size_of("module_memory")
            base = mem + field_offset(btf, "module_memory", "base")
            size = mem + field_offset(btf, "module_memory", "size")
        elif btf.has_member("module", "init_layout"):
            base = field_offset(btf, "module", "init_layout.base")
            size = field_offset(btf, "module", "init_layout.size")
        elif btf.has_member("module", "module_init"):
            base = field_offset(btf, "module", "module_init")
            size = field_offset(btf, "module", "init_size")
        else:
            return 0, 0
    except (BtfError, GuestError):
        return 0, 0
    memory = guest.memory
    return memory.u64(module.address + base), memory.u32(module.address + size)
