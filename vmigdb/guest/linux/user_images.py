"""The programs and shared libraries a process has mapped, and their symbols, rebuilt from its memory.

Nothing is taken from the host: every ELF mapped in a process has its ELF header and program
headers in its first page, and the loader maps its dynamic section, dynamic symbol table
(``.dynsym``), string table and hash table, since the dynamic linker reads them at run time. From
those vmigdb rebuilds a symbols-only ELF (`elf.build_symbol_elf`) with each exported symbol at its
running address, for GDB to load as the shared library (``qXfer:libraries-svr4:read``, then
``vFile``). Section headers and ``.symtab`` are not mapped, so only the dynamic symbols are there:
every function a library exports (``puts``, ``malloc``), and a program's own only if it was linked
with ``-rdynamic``.

Details of the format (the ELF gABI, and glibc's elf/dl-*.c):

- the dynamic section's pointers (``DT_SYMTAB``...) are link-time addresses in the file, and
  glibc's loader adds the load bias to them in place (``elf_get_dynamic_info``) once it has
  processed the object; an object it has not processed yet (at a caught exec, every one but the
  loader itself) still has them unrelocated. A pointer inside the object's mapped span is taken
  as relocated, anything else gets the bias added;
- the number of dynamic symbols is ``nchain`` of ``DT_HASH``, or, with only ``DT_GNU_HASH``, one
  past the last symbol its chains reach;
- of several versions of one symbol (``memcpy@GLIBC_2.2.5``, ``memcpy@@GLIBC_2.14``), only the
  default one is kept (``DT_VERSYM``: the hidden bit 0x8000 marks the others), so a name resolves
  to one address;
- the call-frame information (``.eh_frame``, found through ``PT_GNU_EH_FRAME``'s
  ``.eh_frame_hdr``) is copied in as it is, at its running address, so GDB unwinds through
  functions without frame pointers and backtraces have names all the way up.

A page the process never touched is not in its page tables; if it is part of a mapped file, it
is read from the guest's page cache instead (`pagecache`), as any process reading the file would.

Why by hand and not pyelftools: it reads whole files, and what is here is scattered pieces of a
mapped image (a header page, a dynamic section, tables at run-time addresses).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from vmigdb.guest.base import GuestError, ImageInfo, Library, Mapping
from vmigdb.guest.linux import pagecache
from vmigdb.guest.linux.elf import ElfSection, ElfSymbol, build_symbol_elf
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.kernel import FaultError
from vmigdb.guest.linux.structs import field_offset, field_size, guest_btf
from vmigdb.guest.linux.vmas import Vma, special_name

log = logging.getLogger("vmigdb.guest.linux")

__all__ = ["image_info", "libraries", "library_elf", "symbol_address"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SYM = struct.Struct("<IBBHQQ")
_DYN = struct.Struct("<qQ")
ELF_MAGIC = b"\x7fELF\x02\x01"  # 64-bit, little-endian
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_DYNAMIC, PT_GNU_EH_FRAME = 1, 2, 0x6474E550
PF_X, PF_W = 1, 2
DT_NULL, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT = 0, 4, 5, 6, 10, 11
DT_GNU_HASH, DT_VERSYM = 0x6FFFFEF5, 0x6FFFFFF0
STT_OBJECT, STT_FUNC, STT_TLS, STT_GNU_IFUNC = 1, 2, 6, 10
STB_LOCAL, STB_GLOBAL, STB_WEAK, STB_GNU_UNIQUE = 0, 1, 2, 10
SHN_UNDEF = 0
VERSYM_HIDDEN = 0x8000
AT_NULL, AT_PHDR, AT_BASE, AT_ENTRY = 0, 3, 7, 9
MAX_SYMBOLS = 1 << 18  # more than any real object exports
MAX_TABLE = 16 << 20
VDSO = "[vdso]"
_PAGE = 0x1000


class UserMemory:
    """One process's memory, read through its page tables (``task_cr3``), and for pages they do
    not map yet, from the page cache of the file mapped there (its `Vma` list)."""

    def __init__(self, guest: LinuxGuest, cr3: int, mm: int, vmas: list[Vma]) -> None:
        self._guest = guest
        self._cr3 = cr3
        self._mm = mm
        self._vmas = vmas

    def read(self, va: int, size: int, what: str) -> bytes:
        """Exactly `size` bytes. :raises GuestError: naming `what` if any byte is not in memory"""
        data = self.read_some(va, size)
        if len(data) < size:
            raise GuestError(f"{what} at {va + len(data):#x} is not in memory")
        return data

    def read_some(self, va: int, size: int) -> bytes:
        """Up to `size` bytes from `va`: what the page tables map, the rest from the page cache
        page by page, stopping at the first page in neither."""
        mem = self._guest.memory
        data = bytearray(mem.read_user(self._cr3, va, size))
        while len(data) < size:
            page = self._file_page(va + len(data))
            if page is None:
                break
            data += page[: size - len(data)]
            if len(data) < size:
                data += mem.read_user(self._cr3, va + len(data), size - len(data))
        return bytes(data)

    def _file_page(self, va: int) -> bytes | None:
        """The rest of the page at `va` from the page cache of the file mapped there (or the
        kernel's pages of a special mapping, the vDSO), or None."""
        for vma in self._vmas:
            if not vma.start <= va < vma.end:
                continue
            index = vma.pgoff + ((va - vma.start) >> 12)
            try:
                if vma.file:
                    pa = pagecache.file_page(self._guest, vma.file, index)
                elif (name := special_name(self._guest, vma)) is not None:
                    pa = pagecache.special_page(self._guest, vma.private, index)
                    if pa is None and name == VDSO:  # x86's: its pages are the kernel's image
                        pa = pagecache.vdso_page(self._guest, self._mm, index)
                else:
                    return None
                if pa is None:
                    return None
                offset = va & (_PAGE - 1)
                return self._guest.memory.read_physical(pa + offset, _PAGE - offset)
            except FaultError:
                return None
        return None


def libraries(mappings: list[Mapping], exe_path: str | None) -> list[Library]:
    """The ELF objects in a memory map: each mapped file's mapping at offset 0, the vDSO; the
    program (`exe_path`) first, the rest by address."""
    found: dict[tuple[int, int, int], Library] = {}
    for m in mappings:
        if m.name == VDSO:
            found[(0, 0, m.start)] = Library(VDSO, m.start, (0, 0, 0, m.start))
        elif m.inode and m.offset == 0 and m.name.startswith("/"):
            key = (m.dev[0] << 20 | m.dev[1], m.inode, m.start)
            # A file mapped twice at offset 0 (unusual) is two instances: both are listed.
            found.setdefault(key, Library(m.name, m.start, (m.dev[0], m.dev[1], m.inode, m.start)))
    ordered = sorted(found.values(), key=lambda lib: (lib.path != exe_path, lib.base))
    return ordered


@dataclass(frozen=True, slots=True)
class _Image:
    kind: int  # ET_EXEC or ET_DYN
    bias: int  # added to the file's addresses
    loads: list[tuple[int, int, int]]  # PT_LOAD: (run-time address, size in memory, p_flags)
    dynamic: tuple[int, int] | None  # (run-time address, size)
    eh_frame_hdr: int | None  # run-time address


def _image(mem: UserMemory, base: int, name: str) -> _Image:
    ehdr = _EHDR.unpack(mem.read(base, _EHDR.size, f"{name}: ELF header"))
    ident, kind, _machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = (
        ehdr[:11]
    )
    if not ident.startswith(ELF_MAGIC) or kind not in (ET_EXEC, ET_DYN):
        raise GuestError(f"{name}: no 64-bit ELF executable or shared object at {base:#x}")
    if phentsize != _PHDR.size or not 0 < phnum <= 64:
        raise GuestError(f"{name}: implausible program headers ({phnum} of {phentsize} bytes)")
    raw = mem.read(base + phoff, phnum * _PHDR.size, f"{name}: program headers")
    headers = list(_PHDR.iter_unpack(raw))
    first = min((h[3] for h in headers if h[0] == PT_LOAD), default=0)
    bias = base - (first & ~(_PAGE - 1)) if kind == ET_DYN else 0
    loads = [(bias + h[3], h[6], h[1]) for h in headers if h[0] == PT_LOAD and h[6]]
    dynamic = next(((bias + h[3], h[6]) for h in headers if h[0] == PT_DYNAMIC), None)
    eh = next((bias + h[3] for h in headers if h[0] == PT_GNU_EH_FRAME), None)
    return _Image(kind, bias, loads, dynamic, eh)


DW_EH_PE_PCREL_SDATA4 = 0x1B  # how .eh_frame_hdr points at .eh_frame, as GNU ld writes it
DW_EH_PE_UDATA4, DW_EH_PE_SDATA4 = 0x03, 0x0B
MAX_EH_FRAME = 8 << 20


def _eh_frame(mem: UserMemory, image: _Image, name: str) -> tuple[int, bytes] | None:
    """(address, bytes) of the object's ``.eh_frame``, up to its zero terminator, or None.

    ``.eh_frame_hdr`` (LSB, "Exception Frame Header"): version 1, then the encodings of
    ``eh_frame_ptr``, ``fde_count`` and the table; ``eh_frame_ptr`` follows at offset 4. The
    section is a run of CIE/FDE records, each a 4-byte length (0xffffffff: an 8-byte length
    follows) and that many bytes; a length of 0 ends it.
    """
    if image.eh_frame_hdr is None:
        return None
    header = mem.read(image.eh_frame_hdr, 8, f"{name}: .eh_frame_hdr")
    if header[0] != 1:
        return None
    value = int.from_bytes(header[4:8], "little", signed=header[1] & 0x0F == DW_EH_PE_SDATA4)
    if header[1] == DW_EH_PE_PCREL_SDATA4:
        start = image.eh_frame_hdr + 4 + value
    elif header[1] in (DW_EH_PE_UDATA4, DW_EH_PE_SDATA4):
        start = value + image.bias
    else:
        return None
    end = next((a + n for a, n, _ in image.loads if a <= start < a + n), None)
    if end is None:
        return None
    data = mem.read(start, min(end - start, MAX_EH_FRAME), f"{name}: .eh_frame")
    pos = 0
    while pos + 4 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "little")
        if length == 0:
            return start, data[: pos + 4]
        if length == 0xFFFFFFFF:
            length = int.from_bytes(data[pos + 4 : pos + 12], "little") + 8
        pos += 4 + length
    return start, data[: min(pos, len(data))]


def _dynamic(mem: UserMemory, image: _Image, name: str) -> dict[int, int]:
    """DT_* tag -> value (first occurrence), pointers made run-time addresses."""
    assert image.dynamic is not None
    address, size = image.dynamic
    raw = mem.read(address, min(size, 2 * _PAGE), f"{name}: dynamic section")
    low = min((a for a, _, _ in image.loads), default=0)
    high = max((a + n for a, n, _ in image.loads), default=0)
    pointers = {DT_HASH, DT_STRTAB, DT_SYMTAB, DT_GNU_HASH, DT_VERSYM}
    out: dict[int, int] = {}
    for tag, value in _DYN.iter_unpack(raw[: len(raw) - len(raw) % _DYN.size]):
        if tag == DT_NULL:
            break
        if tag in pointers and not low <= value < high:
            value += image.bias  # not relocated yet (the loader has not processed this object)
        out.setdefault(tag, value)
    return out


def _symbol_count(mem: UserMemory, dyn: dict[int, int], name: str) -> int:
    if DT_HASH in dyn:
        _nbucket, nchain = struct.unpack("<II", mem.read(dyn[DT_HASH], 8, f"{name}: DT_HASH"))
        return nchain
    if DT_GNU_HASH not in dyn:
        raise GuestError(f"{name}: no DT_HASH or DT_GNU_HASH: cannot size its symbol table")
    table = dyn[DT_GNU_HASH]
    nbuckets, symoffset, bloom_size, _shift = struct.unpack(
        "<IIII", mem.read(table, 16, f"{name}: DT_GNU_HASH")
    )
    if nbuckets > MAX_SYMBOLS or bloom_size > MAX_SYMBOLS:
        raise GuestError(f"{name}: implausible DT_GNU_HASH ({nbuckets} buckets)")
    buckets_at = table + 16 + 8 * bloom_size
    buckets = struct.unpack(
        f"<{nbuckets}I", mem.read(buckets_at, 4 * nbuckets, f"{name}: DT_GNU_HASH buckets")
    )
    last = max(buckets, default=0)
    if last < symoffset:
        return symoffset
    chains_at = buckets_at + 4 * nbuckets
    index = last
    while index - symoffset < MAX_SYMBOLS:
        (word,) = struct.unpack("<I", mem.read(chains_at + 4 * (index - symoffset), 4, name))
        if word & 1:
            return index + 1
        index += 1
    raise GuestError(f"{name}: DT_GNU_HASH chain does not end")


def _symbols(mem: UserMemory, image: _Image, name: str) -> list[ElfSymbol]:
    if image.dynamic is None:
        return []  # a static program: nothing of its symbols is mapped
    dyn = _dynamic(mem, image, name)
    if DT_SYMTAB not in dyn or DT_STRTAB not in dyn:
        return []
    count = _symbol_count(mem, dyn, name)
    if not 0 < count <= MAX_SYMBOLS:
        return []
    entsize = dyn.get(DT_SYMENT, _SYM.size)
    if entsize != _SYM.size:
        raise GuestError(f"{name}: DT_SYMENT {entsize} is not {_SYM.size}")
    strsz = min(dyn.get(DT_STRSZ, 0), MAX_TABLE)
    symtab = mem.read(dyn[DT_SYMTAB], count * _SYM.size, f"{name}: .dynsym")
    strtab = mem.read(dyn[DT_STRTAB], strsz, f"{name}: .dynstr")
    versym = b""
    if DT_VERSYM in dyn:
        versym = mem.read(dyn[DT_VERSYM], 2 * count, f"{name}: .gnu.version")
    out = []
    for index, (st_name, info, _other, shndx, value, size) in enumerate(_SYM.iter_unpack(symtab)):
        kind, bind = info & 0xF, info >> 4
        if shndx == SHN_UNDEF or not st_name or st_name >= len(strtab):
            continue
        if kind not in (STT_FUNC, STT_OBJECT, STT_GNU_IFUNC) or bind == STB_LOCAL:
            continue
        if versym and int.from_bytes(versym[2 * index : 2 * index + 2], "little") & VERSYM_HIDDEN:
            continue  # not the default version of this name
        end = strtab.find(b"\0", st_name)
        text = strtab[st_name : end if end >= 0 else len(strtab)].decode("utf-8", "replace")
        out.append(
            ElfSymbol(
                text,
                image.bias + value,
                size,
                "object" if kind == STT_OBJECT else "func",
                "weak" if bind == STB_WEAK else "global",
            )
        )
    return out


def _sections(image: _Image, eh_frame: tuple[int, bytes] | None) -> list[ElfSection]:
    """One section per loaded segment; the executable one is ``.text``, which GDB takes for the
    library's address range in ``info sharedlibrary``. ``.eh_frame``, with its bytes, is cut
    out of the segment holding it (GDB ignores one of two overlapping sections)."""
    pieces: list[tuple[int, int, int]] = []
    cut = (eh_frame[0], eh_frame[0] + len(eh_frame[1])) if eh_frame else (0, 0)
    for address, size, flags in sorted(image.loads):
        end = address + size
        if address <= cut[0] < end:
            pieces += [(address, cut[0] - address, flags), (cut[1], end - cut[1], flags)]
        else:
            pieces.append((address, size, flags))
    sections: list[ElfSection] = []
    names: dict[str, int] = {}
    for address, size, flags in pieces:
        if size <= 0:
            continue
        base = ".text" if flags & PF_X else ".data" if flags & PF_W else ".rodata"
        names[base] = names.get(base, 0) + 1
        name = base if names[base] == 1 else f"{base}.{names[base] - 1}"
        letters = "a" + ("w" if flags & PF_W else "") + ("x" if flags & PF_X else "")
        sections.append(ElfSection(name, address, size, letters))
    if eh_frame is not None:
        sections.append(ElfSection(".eh_frame", eh_frame[0], len(eh_frame[1]), "a", eh_frame[1]))
    return sections


def library_elf(guest: LinuxGuest, cr3: int, mm: int, vmas: list[Vma], library: Library) -> bytes:
    """``bytes library_elf(...)``: the symbols-only ELF of a mapped object, every exported symbol
    at its running address, with its call-frame information.

    :raises GuestError: if its headers are not in memory or are not an ELF object's; a symbol
        table or unwind table that is not (all) in memory is left out (logged)
    """
    mem = UserMemory(guest, cr3, mm, vmas)
    image = _image(mem, library.base, library.path)
    try:
        symbols = _symbols(mem, image, library.path)
    except GuestError as exc:
        log.info("no symbols for %s: %s", library.path, exc)
        symbols = []
    try:
        eh_frame = _eh_frame(mem, image, library.path)
    except GuestError as exc:
        log.info("no unwind table for %s: %s", library.path, exc)
        eh_frame = None
    return build_symbol_elf(symbols, _sections(image, eh_frame))


def symbol_address(
    guest: LinuxGuest, cr3: int, mm: int, vmas: list[Vma], library: Library, name: str
) -> int | None:
    """The running address of `name` in a mapped object's dynamic symbols, or None.

    :raises GuestError: if its headers or symbol table are not in memory
    """
    mem = UserMemory(guest, cr3, mm, vmas)
    image = _image(mem, library.base, library.path)
    return next((s.address for s in _symbols(mem, image, library.path) if s.name == name), None)


def _auxv(guest: LinuxGuest, mm: int) -> dict[int, int]:
    btf = guest_btf(guest)
    offset = field_offset(btf, "mm_struct", "saved_auxv")
    size = field_size(btf, "mm_struct", "saved_auxv")
    raw = guest.memory.read(mm + offset, size)
    out: dict[int, int] = {}
    for key, value in struct.iter_unpack("<QQ", raw[: size - size % 16]):
        if key == AT_NULL:
            break
        out.setdefault(key, value)
    return out


def image_info(guest: LinuxGuest, mm: int, exe_path: str, mappings: list[Mapping]) -> ImageInfo:
    """Where the program of ``struct mm_struct *mm`` is loaded and where it starts.

    :raises GuestError, FaultError: if the mm cannot be read
    """
    auxv = _auxv(guest, mm)
    entry = auxv.get(AT_ENTRY, 0)
    starts = [m.start for m in mappings if m.name == exe_path and m.offset == 0]
    load_address = min(starts) if starts else entry & ~(_PAGE - 1)
    interpreter = auxv.get(AT_BASE) or None
    return ImageInfo(exe_path, entry, load_address, interpreter)
