"""QEMU guest-memory dumps (``dump-guest-memory``, ELF): where each piece of RAM is, and the notes.

What QEMU writes (dump/dump.c and target/i386/arch_dump.c; the same layout in 7.2 and 10.x):

- an ELF64 header, ``e_type`` ET_CORE, ``e_machine`` EM_X86_64 (EM_386 when the first vCPU is not
  in long mode). QEMU 7.2 writes ``e_ehsize`` as 8 (the size of a pointer): it is not checked here;
- one PT_NOTE, then one PT_LOAD per block of guest RAM: ``p_paddr`` is the guest-physical address,
  ``p_offset`` where its bytes are in the file (``p_filesz == p_memsz`` unless the dump was
  filtered; the rest reads as zeros). With 0xffff or more program headers ``e_phnum`` is PN_XNUM
  and the real count is section 0's ``sh_info``;
- notes: one "CORE" NT_PRSTATUS per vCPU, then one "QEMU" note (type 0, a ``QEMUCPUState``) per
  vCPU in the same order, then "VMCOREINFO" when the guest has QEMU's vmcoreinfo device.
  `vmigdb.hv.libvmi.cpustate` decodes the per-vCPU notes.

Parsed with `struct` rather than pyelftools: five fixed little-endian records, and what matters here
is what pyelftools does not do — checking every segment is really in the file (a truncated copy must
be one clear error, not zeros), refusing overlaps, and reading nothing but headers and notes (a
dump is gigabytes; its memory is read later, on demand).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmigdb.errors import SetupError

__all__ = [
    "EM_386",
    "EM_X86_64",
    "DumpFormatError",
    "ElfCore",
    "LoadSegment",
    "Note",
    "identify",
    "merge_ranges",
    "read_elf_core",
]

ELF_MAGIC = b"\x7fELF"
EM_386 = 3
EM_X86_64 = 62
_ET_CORE = 4
_PT_LOAD = 1
_PT_NOTE = 4
_PN_XNUM = 0xFFFF
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr: type flags offset vaddr paddr filesz memsz align
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_NHDR = struct.Struct("<III")  # Elf64_Nhdr: namesz descsz type (4-byte aligned name and desc)
_MAX_PHNUM = 1 << 20  # QEMU writes one PT_LOAD per RAM block: a handful, or thousands at most
_MAX_NOTES_BYTES = 64 << 20  # notes are ~1 KiB per vCPU

# First bytes of the dump formats that are not ELF, to say what a file is when it is not ours.
_OTHER_FORMATS = (
    (b"KDUMP   ", "a kdump-compressed dump (dump-guest-memory format=kdump-*)"),
    (b"makedumpfile", "a flattened makedumpfile dump"),
    (b"PAGEDU64", "a Windows crash dump (dump-guest-memory format=win-dmp)"),
    (b"PAGEDUMP", "a 32-bit Windows crash dump"),
    (b"QEVM", "a QEMU migration stream (savevm/migrate), not a memory dump"),
    (b"\x1f\x8b", "gzip-compressed (decompress it first)"),
    (b"\xfd7zXZ\x00", "xz-compressed (decompress it first)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed (decompress it first)"),
)


class DumpFormatError(SetupError):
    """The file is not a memory dump vmigdb can read, or is damaged; the message says which."""


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """One PT_LOAD: guest-physical ``[paddr, paddr + memsz)``, the first ``filesz`` bytes in the file
    at ``offset`` and the rest zeros."""

    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True, slots=True)
class Note:
    """One ELF note: its owner ("CORE", "QEMU", "VMCOREINFO"), type, and descriptor bytes."""

    name: str
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfCore:
    """The headers and notes of an ELF core dump (its memory stays in the file).

    :ivar path: The dump.
    :ivar size: Its size in bytes when read.
    :ivar machine: ``e_machine``: `EM_X86_64` or `EM_386`.
    :ivar loads: PT_LOAD segments with memory, sorted by ``paddr``, none overlapping.
    :ivar notes: Every note of every PT_NOTE, in file order.
    :ivar phdrs: The raw program-header table (identifies the layout, e.g. for a cache key).
    """

    path: Path
    size: int
    machine: int
    loads: tuple[LoadSegment, ...]
    notes: tuple[Note, ...]
    phdrs: bytes

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical RAM in the dump as ``(start, end)`` ranges, end exclusive, merged."""
        return merge_ranges((s.paddr, s.end) for s in self.loads)

    @property
    def vmcoreinfo(self) -> bytes | None:
        """The guest kernel's VMCOREINFO text, if QEMU put it in a note (vmcoreinfo device)."""
        for note in self.notes:
            if note.name == "VMCOREINFO":
                return note.desc.split(b"\0", 1)[0]
        return None


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` ranges with touching ones joined (empty ones dropped)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def identify(head: bytes) -> str | None:
    """What a file is, from its first bytes, when it is a known format that is not an ELF core."""
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            return what
    return None


def _pread(fd: int, length: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, length - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_elf_core(fd: int, path: Path) -> ElfCore:
    """Parse and check the ELF core dump open at *fd*; its memory is not read.

    ``ElfCore read_elf_core(int fd, Path path)``: *path* names the file in messages.

    :raises DumpFormatError: if it is not a 64-bit little-endian x86 ELF core, or any header, note
        or segment lies past the end of the file (a truncated copy).
    """
    size = os.fstat(fd).st_size
    head = _pread(fd, _EHDR.size, 0)
    if not head.startswith(ELF_MAGIC):
        what = identify(head)
        raise DumpFormatError(
            f"{path} is {what}: vmigdb reads ELF dumps (dump-guest-memory without format)"
            if what
            else f"{path} is not an ELF core dump"
        )
    if len(head) < _EHDR.size:
        raise DumpFormatError(f"{path} is truncated: {size} bytes, less than an ELF header")
    (ident, e_type, machine, _ver, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, _shnum, _shstrndx) = _EHDR.unpack(head)  # fmt: skip
    if ident[4] != 2:
        raise DumpFormatError(
            f"{path} is a 32-bit ELF dump (the guest was not in 64-bit mode): vmigdb reads ELF64"
        )
    if ident[5] != 1:
        raise DumpFormatError(f"{path} is a big-endian ELF file, not an x86 guest's dump")
    if e_type != _ET_CORE:
        raise DumpFormatError(f"{path} is an ELF file but not a core dump (e_type {e_type})")
    if machine not in (EM_X86_64, EM_386):
        raise DumpFormatError(f"{path} is not an x86 guest's dump (ELF machine {machine})")
    if phentsize != _PHDR.size:
        raise DumpFormatError(f"{path}: program headers of {phentsize} bytes, not {_PHDR.size}")

    if phnum == _PN_XNUM:  # the real count is in section header 0's sh_info
        if shentsize != _SHDR.size:
            raise DumpFormatError(f"{path}: PN_XNUM program headers but no section header 0")
        sh0 = _pread(fd, _SHDR.size, shoff)
        if len(sh0) < _SHDR.size:
            raise DumpFormatError(f"{path} is truncated: section header 0 is past its end")
        phnum = _SHDR.unpack(sh0)[7]
    if not 0 < phnum <= _MAX_PHNUM:
        raise DumpFormatError(f"{path}: {phnum} program headers")
    phdrs = _pread(fd, phnum * _PHDR.size, phoff)
    if len(phdrs) < phnum * _PHDR.size:
        raise DumpFormatError(f"{path} is truncated: its program headers end past {size} bytes")

    loads: list[LoadSegment] = []
    notes: list[Note] = []
    for i in range(phnum):
        p_type, _f, offset, _va, paddr, filesz, memsz, _al = _PHDR.unpack_from(
            phdrs, i * _PHDR.size
        )
        if p_type == _PT_LOAD and memsz:
            if filesz > memsz:
                raise DumpFormatError(
                    f"{path}: segment at physical {paddr:#x} is larger in the file"
                )
            if offset + filesz > size:
                raise DumpFormatError(
                    f"{path} is truncated: guest-physical {paddr:#x}-{paddr + memsz:#x} needs "
                    f"bytes up to {offset + filesz} but the file has {size}; copy or dump it again"
                )
            loads.append(LoadSegment(paddr, offset, filesz, memsz))
        elif p_type == _PT_NOTE and filesz:
            if offset + filesz > size:
                raise DumpFormatError(f"{path} is truncated: its notes end past {size} bytes")
            if filesz > _MAX_NOTES_BYTES:
                raise DumpFormatError(f"{path}: a note segment of {filesz} bytes")
            notes += _parse_notes(_pread(fd, filesz, offset), path)
    if not loads:
        raise DumpFormatError(f"{path} is an ELF core with no memory in it (no PT_LOAD)")
    loads.sort(key=lambda s: s.paddr)
    for a, b in zip(loads, loads[1:], strict=False):
        if b.paddr < a.end:
            raise DumpFormatError(f"{path}: memory segments overlap at guest-physical {b.paddr:#x}")
    return ElfCore(path, size, machine, tuple(loads), tuple(notes), phdrs)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _parse_notes(data: bytes, path: Path) -> list[Note]:
    notes = []
    pos = 0
    while pos + _NHDR.size <= len(data):
        namesz, descsz, n_type = _NHDR.unpack_from(data, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if desc_at + descsz > len(data):
            raise DumpFormatError(f"{path}: a note runs past the end of its segment")
        name = data[name_at : name_at + namesz].split(b"\0", 1)[0].decode("ascii", "replace")
        notes.append(Note(name, n_type, data[desc_at : desc_at + descsz]))
        pos = end
    return notes
