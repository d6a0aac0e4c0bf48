"""Rebuilding a shared library's symbols from a process's memory, checked against the file itself:
the host's libc, laid out in a fake address space the way the loader maps it, must give every
exported symbol at load address + its value (default versions only) and the file's .eh_frame."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmigdb.guest.base import GuestError, Library, Mapping
from vmigdb.guest.linux import user_images
from vmigdb.guest.linux.elf import ElfSymbol

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
BASE = 0x7F12_3400_0000
needs_libc = pytest.mark.skipif(
    not LIBC.is_file() or shutil.which("nm") is None or shutil.which("readelf") is None,
    reason="needs the host's libc and binutils",
)


class FileImage:
    """A file's PT_LOAD segments at `base`, as the loader maps them; nothing else is readable."""

    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.pieces: list[tuple[int, int, int]] = []  # (address, file offset, file size)
        self.ends: list[tuple[int, int]] = []
        phoff, phnum = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<H", data, 56)[0]
        for i in range(phnum):
            kind, _flags, offset, vaddr, _p, filesz, memsz, _a = struct.unpack_from(
                "<IIQQQQQQ", data, phoff + 56 * i
            )
            if kind == 1:
                self.pieces.append((base + vaddr, offset, filesz))
                self.ends.append((base + vaddr, base + vaddr + memsz))

    def read_some(self, va: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            at = va + len(out)
            for address, offset, filesz in self.pieces:
                if address <= at < address + filesz:
                    n = min(size - len(out), address + filesz - at)
                    out += self.data[offset + at - address : offset + at - address + n]
                    break
            else:
                if any(lo <= at < hi for lo, hi in self.ends):  # bss: zeros
                    out.append(0)
                    continue
                break
        return bytes(out)

    def read(self, va: int, size: int, what: str) -> bytes:
        data = self.read_some(va, size)
        if len(data) != size:
            raise GuestError(f"{what} at {va + len(data):#x} is not in memory")
        return data


def defined_dynamic(path: Path) -> dict[str, int]:
    """nm's default-version (or unversioned) defined dynamic symbols: name -> value."""
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True
    ).stdout
    symbols = {}
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]+) ([TtWwDdBbRriVv]) (\S+)$", line)
        if not m or "@" in m.group(3) and "@@" not in m.group(3):
            continue  # a hidden version: not the one a name resolves to
        symbols[m.group(3).split("@")[0]] = int(m.group(1), 16)
    return symbols


@needs_libc
def test_libc_symbols_from_memory_are_the_files() -> None:
    image = FileImage(LIBC.read_bytes(), BASE)
    parsed = user_images._image(image, BASE, "libc")  # type: ignore[arg-type]
    assert parsed.bias == BASE and parsed.dynamic is not None
    symbols = user_images._symbols(image, parsed, "libc")  # type: ignore[arg-type]
    ours: dict[str, list[ElfSymbol]] = {}
    for symbol in symbols:
        ours.setdefault(symbol.name, []).append(symbol)
    truth = defined_dynamic(LIBC)
    for name in ("puts", "malloc", "memcpy", "printf", "open64", "environ"):
        assert [s.address for s in ours[name]] == [BASE + truth[name]], name
    assert all(len(v) == 1 for v in ours.values())  # one address per name: default versions
    assert ours["puts"][0].kind == "func" and ours["environ"][0].kind == "object"
    assert len(ours) > 0.9 * len(truth)  # TLS and section symbols aside, all of them


@needs_libc
def test_libc_eh_frame_from_memory_is_the_files() -> None:
    data = LIBC.read_bytes()
    image = FileImage(data, BASE)
    parsed = user_images._image(image, BASE, "libc")  # type: ignore[arg-type]
    found = user_images._eh_frame(image, parsed, "libc")  # type: ignore[arg-type]
    sections = subprocess.run(
        ["readelf", "-SW", str(LIBC)], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"\.eh_frame\s+PROGBITS\s+([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", sections)
    assert m and found is not None
    address, offset, size = (int(g, 16) for g in m.groups())
    assert found[0] == BASE + address
    assert found[1] == data[offset : offset + size]
    sections_out = user_images._sections(parsed, found)
    text = [s for s in sections_out if s.name == ".text"]
    assert len(text) == 1 and "x" in text[0].flags
    frame = [s for s in sections_out if s.name == ".eh_frame"]
    assert frame and frame[0].data == found[1]
    for s in sections_out:  # nothing overlaps .eh_frame: GDB would ignore one of the two
        if s.name != ".eh_frame":
            assert s.address + s.size <= found[0] or s.address >= found[0] + len(found[1]), s


def test_unrelocated_dynamic_pointers_get_the_bias() -> None:
    """Before the loader has processed an object its DT_* pointers are file addresses."""
    dynamic = struct.pack("<qQqQqQqQ", 6, 0x300, 5, 0x400, 10, 16, 0, 0)
    memory = {BASE + 0x1000: dynamic}

    class Mem:
        def read(self, va: int, size: int, what: str) -> bytes:
            for start, data in memory.items():
                if start <= va and va + size <= start + len(data) + 0x1000:
                    return (data + bytes(0x1000))[va - start : va - start + size]
            raise GuestError(what)

    image = user_images._Image(3, BASE, [(BASE, 0x2000, 5)], (BASE + 0x1000, 64), None)
    found = user_images._dynamic(Mem(), image, "x")  # type: ignore[arg-type]
    assert found[6] == BASE + 0x300 and found[5] == BASE + 0x400 and found[10] == 16
    relocated = struct.pack("<qQqQ", 6, BASE + 0x300, 0, 0)
    memory[BASE + 0x1000] = relocated
    assert user_images._dynamic(Mem(), image, "x")[6] == BASE + 0x300  # type: ignore[arg-type]


def mapping(start: int, end: int, offset: int, inode: int, name: str) -> Mapping:
    return Mapping(start, end, "r--p", offset, (0, 2) if inode else (0, 0), inode, name)


def test_libraries_in_a_memory_map() -> None:
    maps = [
        mapping(0x5000, 0x6000, 0, 23, "/bin/app"),
        mapping(0x6000, 0x7000, 0x1000, 23, "/bin/app"),
        mapping(0x7F00_0000, 0x7F00_1000, 0, 0, ""),
        mapping(0x7F10_0000, 0x7F10_1000, 0, 35, "/lib/libc.so.6"),
        mapping(0x7F10_1000, 0x7F10_9000, 0x1000, 35, "/lib/libc.so.6"),
        mapping(0x7F20_0000, 0x7F20_1000, 0, 34, "/lib/ld.so"),
        mapping(0x7FFF_0000, 0x7FFF_2000, 0, 0, "[vdso]"),
        mapping(0x7FFF_2000, 0x7FFF_3000, 0, 0, "[stack]"),
    ]
    found = user_images.libraries(maps, "/bin/app")
    assert [(lib.path, lib.base) for lib in found] == [
        ("/bin/app", 0x5000),
        ("/lib/libc.so.6", 0x7F10_0000),
        ("/lib/ld.so", 0x7F20_0000),
        ("[vdso]", 0x7FFF_0000),
    ]
    assert found[1] == Library("/lib/libc.so.6", 0x7F10_0000, (0, 2, 35, 0x7F10_0000))


def test_maps_line_format() -> None:
    """/proc/PID/maps: the name at column 73, a trailing space for anonymous memory."""
    named = Mapping(0x56158F374000, 0x56158F375000, "r--p", 0, (0, 2), 23, "/bin/dynhello")
    assert named.line() == (
        "56158f374000-56158f375000 r--p 00000000 00:02 23" + " " * 25 + "/bin/dynhello"
    )
    assert Mapping(0x1000, 0x2000, "rw-p", 0, (0, 0), 0, "").line() == (
        "00001000-00002000 rw-p 00000000 00:00 0 "
    )
    small = Mapping(0x7F00_0000_0000, 0x7F00_0000_1000, "r-xs", 0x1234000, (259, 1), 9, "/x")
    assert small.line() == "7f0000000000-7f0000001000 r-xs 01234000 103:01 9" + " " * 25 + "/x"
    # A header past column 72 is not padded; seq_pad() still adds its one space.
    wide = Mapping(0xFFFF_FFFF_FF60_0000, 0xFFFF_FFFF_FF60_1000, "--xp", 0, (0, 0), 2**64 - 1, "v")
    assert wide.line() == (
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 18446744073709551615  v"
    )
