"""Tests for the synthesized symbols-only kernel ELF, checked by GDB 13 itself.

GDB reads the file in batch mode, alone and connected to a tiny in-test remote stub (enough RSP
for ``target remote``, ``x`` and ``bt``), to show that the file gives names and sections while all
memory, code included, comes from the target.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmigdb.guest.linux.elf import (
    MAX_SYMBOL_SIZE,
    ElfSection,
    ElfSymbol,
    build_symbol_elf,
    kind_for_type,
    sizes_from_addresses,
)

GDB = "/usr/bin/gdb"
needs_gdb = pytest.mark.skipif(not os.access(GDB, os.X_OK), reason="needs /usr/bin/gdb")

TEXT = 0xFFFF_FFFF_8100_0000
DATA = 0xFFFF_FFFF_8200_0000
SECTIONS = [
    ElfSection(".text", TEXT, 0x1000, "ax"),
    ElfSection(".data", DATA, 0x1000, "wa"),
]
KALLSYMS = [
    ("func_a", TEXT, "T"),
    ("func_b", TEXT + 0x40, "T"),
    ("helper", TEXT + 0x80, "t"),
    ("dup", TEXT + 0xC0, "t"),
    ("dup", TEXT + 0x100, "T"),
    ("weak_fn", TEXT + 0x140, "W"),
    ("_etext", TEXT + 0x1000, "T"),  # the end of .text: in no section
    ("data_x", DATA, "D"),
    ("data_y", DATA + 0x10, "d"),
    ("ro_z", DATA + 0x20, "R"),
    ("percpu_var", 0x1A000, "A"),
]


def kernel_elf() -> bytes:
    return build_symbol_elf(sizes_from_addresses(KALLSYMS), SECTIONS)


@pytest.fixture
def elf_path(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux-symbols"
    path.write_bytes(kernel_elf())
    return path


def gdb_batch(path: Path, *commands: str, timeout: float = 60) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", f"file {path}"]
    for command in commands:
        args += ["-ex", command]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return done.stdout + done.stderr


# --- a tiny ELF reader: the parts the tests check ------------------------------------------------


def read_elf(data: bytes) -> dict:
    header = struct.unpack_from("<16sHHIQQQIHHHHHH", data)
    ident, e_type, machine, _, entry, phoff, shoff = header[:7]
    phentsize, phnum, shentsize, shnum, shstrndx = header[9:]
    shdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    shstr = shdrs[shstrndx]
    strings = data[shstr[4] : shstr[4] + shstr[5]]

    def name_at(table: bytes, offset: int) -> str:
        return table[offset : table.index(b"\0", offset)].decode()

    sections = [
        {"name": name_at(strings, h[0]), "type": h[1], "flags": h[2], "addr": h[3], "offset": h[4],
         "size": h[5], "link": h[6], "info": h[7], "entsize": h[9]}
        for h in shdrs
    ]  # fmt: skip
    symtab = next(s for s in sections if s["type"] == 2)
    strtab = sections[symtab["link"]]
    names = data[strtab["offset"] : strtab["offset"] + strtab["size"]]
    symbols = []
    for i in range(symtab["size"] // 24):
        st_name, info, other, shndx, value, size = struct.unpack_from(
            "<IBBHQQ", data, symtab["offset"] + 24 * i
        )
        symbols.append({"name": name_at(names, st_name), "bind": info >> 4, "type": info & 15,
                        "other": other, "shndx": shndx, "value": value, "size": size})  # fmt: skip
    segments = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    return {"ident": ident, "type": e_type, "machine": machine, "entry": entry,
            "sections": sections, "symtab": symtab, "symbols": symbols, "segments": segments}  # fmt: skip


# --- sizes_from_addresses and kind_for_type ------------------------------------------------------


def test_kind_for_type() -> None:
    assert kind_for_type("T") == ("func", "global")
    assert kind_for_type("t") == ("func", "local")
    assert kind_for_type("W") == ("func", "weak")
    for letter in "DBR":
        assert kind_for_type(letter) == ("object", "global")
        assert kind_for_type(letter.lower()) == ("object", "local")
    assert kind_for_type("V") == ("object", "weak")
    assert kind_for_type("A") == ("notype", "global")
    assert kind_for_type("a") == ("notype", "local")
    assert kind_for_type("?") == ("notype", "local")


def test_sizes_from_addresses() -> None:
    far = TEXT + 0x100 + MAX_SYMBOL_SIZE + 1
    symbols = sizes_from_addresses(
        [
            ("b", TEXT + 0x10, "t"),
            ("a", TEXT, "T"),
            ("a_alias", TEXT, "T"),  # aliases share the size
            ("c", TEXT + 0x100, "d"),  # the next is more than MAX_SYMBOL_SIZE away
            ("d", far, "W"),  # the last
        ]
    )
    assert [s.name for s in symbols] == ["b", "a", "a_alias", "c", "d"]  # input order
    assert symbols[0] == ElfSymbol("b", TEXT + 0x10, 0xF0, "func", "local")
    assert symbols[1] == ElfSymbol("a", TEXT, 0x10, "func", "global")
    assert symbols[2].size == 0x10
    assert symbols[3] == ElfSymbol("c", TEXT + 0x100, 0, "object", "local")
    assert symbols[4] == ElfSymbol("d", far, 0, "func", "weak")
    exactly = sizes_from_addresses([("x", 0, "T"), ("y", MAX_SYMBOL_SIZE, "T")])
    assert exactly[0].size == MAX_SYMBOL_SIZE
    assert sizes_from_addresses([("x", 0, "T"), ("y", 0x30, "T")], max_size=0x10)[0].size == 0
    assert sizes_from_addresses([]) == []


# --- the file's structure ------------------------------------------------------------------------


def test_structure() -> None:
    elf = read_elf(kernel_elf())
    assert elf["ident"][:7] == b"\x7fELF\x02\x01\x01"  # ELF64, little-endian, version 1
    assert (elf["type"], elf["machine"], elf["entry"]) == (2, 62, 0)  # ET_EXEC, EM_X86_64
    sections = elf["sections"]
    assert [s["name"] for s in sections] == [
        "",
        ".text",
        ".data",
        ".symtab",
        ".strtab",
        ".shstrtab",
    ]
    text, data = sections[1], sections[2]
    assert (text["type"], text["addr"], text["size"], text["flags"]) == (8, TEXT, 0x1000, 0x6)
    assert (data["type"], data["addr"], data["size"], data["flags"]) == (8, DATA, 0x1000, 0x3)
    assert elf["segments"] == [
        (1, 5, 0, TEXT, TEXT, 0, 0x1000, 1),  # PT_LOAD, R+X, nothing in the file
        (1, 6, 0, DATA, DATA, 0, 0x1000, 1),  # PT_LOAD, R+W
    ]

    symbols = elf["symbols"]
    assert symbols[0] == {"name": "", "bind": 0, "type": 0, "other": 0, "shndx": 0, "value": 0,
                          "size": 0}  # fmt: skip
    binds = [s["bind"] for s in symbols[1:]]
    assert binds == sorted(binds, key=bool)  # locals first
    first_global = elf["symtab"]["info"]
    assert symbols[first_global - 1]["bind"] == 0 and symbols[first_global]["bind"] != 0
    assert elf["symtab"]["entsize"] == 24

    by_name: dict[str, list[dict]] = {}
    for s in symbols[1:]:
        by_name.setdefault(s["name"], []).append(s)
    assert len(symbols) == len(KALLSYMS) + 1
    (func_a,) = by_name["func_a"]
    assert (func_a["value"], func_a["size"], func_a["type"], func_a["bind"], func_a["shndx"]) == (
        TEXT, 0x40, 2, 1, 1,  # STT_FUNC, STB_GLOBAL, .text
    )  # fmt: skip
    assert [(s["bind"], s["value"]) for s in by_name["dup"]] == [
        (0, TEXT + 0xC0),
        (1, TEXT + 0x100),
    ]
    assert by_name["helper"][0]["bind"] == 0
    assert by_name["weak_fn"][0]["bind"] == 2  # STB_WEAK
    # The last function's size runs to the next symbol, _etext, at the end of .text.
    assert by_name["weak_fn"][0]["size"] == 0x1000 - 0x140
    assert (by_name["_etext"][0]["shndx"], by_name["_etext"][0]["size"]) == (0xFFF1, 0)  # SHN_ABS
    (data_x,) = by_name["data_x"]
    assert (data_x["type"], data_x["shndx"], data_x["size"]) == (1, 2, 0x10)  # STT_OBJECT, .data
    # ro_z's next symbol is far away: size 0. percpu_var is in no section.
    assert (by_name["ro_z"][0]["size"], by_name["ro_z"][0]["shndx"]) == (0, 2)
    assert by_name["percpu_var"][0]["shndx"] == 0xFFF1
    assert (by_name["percpu_var"][0]["type"], by_name["percpu_var"][0]["value"]) == (0, 0x1A000)


def test_binding_from_global_names() -> None:
    symbols = [ElfSymbol("g", TEXT, 0, "func"), ElfSymbol("l", TEXT + 8, 0, "func"),
               ElfSymbol("w", TEXT + 16, 0, "func", "weak")]  # fmt: skip
    every = read_elf(build_symbol_elf(symbols, SECTIONS))["symbols"][1:]
    assert [(s["name"], s["bind"]) for s in every] == [("g", 1), ("l", 1), ("w", 2)]
    some = read_elf(build_symbol_elf(symbols, SECTIONS, global_names={"g"}))
    assert [(s["name"], s["bind"]) for s in some["symbols"][1:]] == [("l", 0), ("g", 1), ("w", 2)]
    assert some["symtab"]["info"] == 2
    none = read_elf(build_symbol_elf(symbols[:2], SECTIONS, global_names=set()))
    assert [s["bind"] for s in none["symbols"][1:]] == [0, 0] and none["symtab"]["info"] == 3


def test_size_clipped_to_section_and_edge_cases() -> None:
    symbols = [ElfSymbol("long", TEXT + 0xF00, 0x10000, "func", "global")]
    (sym,) = read_elf(build_symbol_elf(symbols, SECTIONS))["symbols"][1:]
    assert sym["size"] == 0x100
    empty = read_elf(build_symbol_elf([], []))
    assert [s["name"] for s in empty["sections"]] == ["", ".symtab", ".strtab", ".shstrtab"]
    assert len(empty["symbols"]) == 1 and empty["segments"] == []
    with pytest.raises(ValueError, match="NUL"):
        build_symbol_elf([ElfSymbol("a\0b", TEXT, 0, "func")], SECTIONS)
    with pytest.raises(ValueError, match="flag"):
        build_symbol_elf([], [ElfSection(".text", TEXT, 1, "axq")])


def test_pyelftools_reads_it() -> None:
    elftools = pytest.importorskip("elftools.elf.elffile")
    import io

    elf = elftools.ELFFile(io.BytesIO(kernel_elf()))
    assert elf.header.e_type == "ET_EXEC" and elf.header.e_machine == "EM_X86_64"
    text = elf.get_section_by_name(".text")
    assert (text.header.sh_type, text.header.sh_addr) == ("SHT_NOBITS", TEXT)
    symtab = elf.get_section_by_name(".symtab")
    found = {(s.name, s["st_info"]["bind"]) for s in symtab.iter_symbols()}
    assert {("dup", "STB_LOCAL"), ("dup", "STB_GLOBAL"), ("weak_fn", "STB_WEAK")} <= found
    (data_x,) = symtab.get_symbol_by_name("data_x")
    assert (data_x["st_value"], data_x["st_info"]["type"], data_x["st_shndx"]) == (
        DATA, "STT_OBJECT", 2,
    )  # fmt: skip
    assert [seg["p_filesz"] for seg in elf.iter_segments()] == [0, 0]


# --- GDB 13, no target ---------------------------------------------------------------------------


@needs_gdb
def test_gdb_reads_names_and_sections(elf_path: Path) -> None:
    out = gdb_batch(
        elf_path,
        f"info symbol {TEXT + 0x10:#x}",
        "info address func_a",
        f"info line *{TEXT + 0x10:#x}",
        "break func_b",
        "p &data_x",
        f"info symbol {DATA + 0x14:#x}",
        "info functions ^dup$",
        "break dup",
        "info address percpu_var",
        f"info symbol {0x1A000:#x}",
        "info files",
    )
    assert "func_a + 16 in section .text" in out
    assert f'Symbol "func_a" is at {TEXT:#x} in a file compiled without debugging.' in out
    assert f"No line number information available for address {TEXT + 0x10:#x} <func_a+16>" in out
    assert f"Breakpoint 1 at {TEXT + 0x40:#x}" in out
    assert f"<data variable, no debug info> *) {DATA:#x} <data_x>" in out
    assert "data_y + 4 in section .data" in out
    assert re.search(rf"{TEXT + 0xC0:#x}\s+dup\n{TEXT + 0x100:#x}\s+dup\n", out), out
    assert f"Breakpoint 2 at {TEXT + 0xC0:#x} (2 locations)" in out
    # An absolute symbol (a per-CPU offset) has an address but labels no address.
    assert f'Symbol "percpu_var" is at {0x1A000:#x} in a file' in out
    assert f"No symbol matches {0x1A000:#x}." in out
    assert f"{TEXT:#018x} - {TEXT + 0x1000:#018x} is .text" in out
    assert f"{DATA:#018x} - {DATA + 0x1000:#018x} is .data" in out
    assert "warning: Loadable section" not in out and "BFD:" not in out


@needs_gdb
def test_gdb_alone_shows_nobits_as_zeros(elf_path: Path) -> None:
    """Without a target GDB serves NOBITS sections as zeros (see the module docstring): the test
    documents it, so that a GDB that starts erroring here, or a file that stops, is noticed."""
    out = gdb_batch(elf_path, "x/i func_a", f"x/gx {TEXT + 0x2000:#x}")
    assert re.search(r"<func_a>:\s+add\s+%al,\(%rax\)", out), out
    assert f"Cannot access memory at address {TEXT + 0x2000:#x}" in out  # outside the sections


# --- GDB 13 connected to a target ----------------------------------------------------------------


class TinyStub:
    """Just enough of a GDB remote stub: memory from a dict of pages, every other read an error.

    Registers: rip and rsp only (a short ``g`` reply; GDB takes the rest as unavailable).
    """

    def __init__(self, memory: dict[int, bytes], rip: int, rsp: int) -> None:
        self.memory = memory
        self.regs = struct.pack("<16QQ", *([0] * 7 + [rsp] + [0] * 8), rip)
        self.reads: list[tuple[int, int]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def read(self, addr: int, length: int) -> bytes | None:
        for base, data in self.memory.items():
            if base <= addr < base + len(data):
                return data[addr - base : addr - base + length]
        return None

    def reply(self, packet: str) -> str:
        if packet.startswith("qSupported"):
            return "PacketSize=4000"
        if packet == "?":
            return "S05"
        if packet == "g":
            return self.regs.hex()
        if packet.startswith("H") or packet.startswith("D"):
            return "OK"
        if packet == "qAttached":
            return "1"
        if packet.startswith("m"):
            addr, length = (int(x, 16) for x in packet[1:].split(","))
            self.reads.append((addr, length))
            data = self.read(addr, length)
            return "E14" if data is None else data.hex()
        return ""

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            buffer = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while True:
                    buffer = buffer.lstrip(b"+-\x03")
                    match = re.match(rb"\$([^#]*)#[0-9a-fA-F]{2}", buffer)
                    if match is None:
                        break
                    buffer = buffer[match.end() :]
                    body = self.reply(match.group(1).decode())
                    checksum = sum(body.encode()) & 0xFF
                    conn.sendall(b"+$" + body.encode() + b"#%02x" % checksum)

    def close(self) -> None:
        self.listener.close()


@needs_gdb
def test_gdb_connected_reads_code_and_data_from_the_target(elf_path: Path) -> None:
    # Readable: func_a and func_b (the first 0x80 bytes of .text) and a stack page. The rest of
    # .text and all of .data are not, as freed .init.text or an unmapped page would not be.
    func_a = bytes.fromhex("55 4889e5 c3").ljust(0x40, b"\xcc")  # push %rbp; mov %rsp,%rbp; ret
    func_b = bytes.fromhex("90" * 0x10 + "c3").ljust(0x40, b"\xcc")  # nop...; ret
    stack = 0xFFFF_C900_0000_0000
    frame = struct.pack("<QQ", 0, TEXT + 0x50).ljust(0x1000, b"\0")  # saved rbp, return address
    stub = TinyStub({TEXT: func_a + func_b, stack: frame}, rip=TEXT + 1, rsp=stack)
    try:
        out = gdb_batch(
            elf_path,
            f"target remote 127.0.0.1:{stub.port}",
            "info symbol $pc",
            "x/3i func_a",
            "bt 3",
            "x/i helper",
            "x/gx &data_x",
            "set trust-readonly-sections on",
            "x/i dup",
            "x/gx &data_y",
        )
    finally:
        stub.close()
    assert "func_a + 1 in section .text" in out, out
    assert re.search(r"<func_a>:\s+push\s+%rbp", out), out
    assert re.search(r"<func_a\+1>:\s+mov\s+%rsp,%rbp", out), out
    assert re.search(r"<func_a\+4>:\s+ret", out), out
    assert re.search(
        rf"#0\s+{TEXT + 1:#018x} in func_a \(\)\n#1\s+{TEXT + 0x50:#018x} in func_b", out
    )
    # Unreadable on the target: an error, not zeros from the file.
    assert f"Cannot access memory at address {TEXT + 0x80:#x}" in out, out
    assert f"Cannot access memory at address {DATA:#x}" in out, out
    # Only with trust-readonly-sections on does GDB read a read-only section from the file (a
    # writable one never), and gets zeros: leave it off (for a kernel that patches its own text
    # it is wrong anyway).
    assert re.search(r"<dup>:\s+add\s+%al,\(%rax\)", out), out
    assert f"Cannot access memory at address {DATA + 0x10:#x}" in out, out
    assert not any(addr <= TEXT + 0xC0 < addr + length for addr, length in stub.reads)


# --- scale ---------------------------------------------------------------------------------------


@needs_gdb
def test_150k_symbols(tmp_path: Path) -> None:
    rng = random.Random(1)
    addresses = sorted(rng.sample(range(TEXT, TEXT + 0x200_0000), 150_000))
    kallsyms = [(f"sym_{i}_{'x' * (i % 24)}", a, "Tt"[i % 2]) for i, a in enumerate(addresses)]
    start = time.perf_counter()
    symbols = sizes_from_addresses(kallsyms)
    sized = time.perf_counter()
    data = build_symbol_elf(symbols, [ElfSection(".text", TEXT, 0x200_0000, "ax")])
    built = time.perf_counter()
    print(
        f"\n150k symbols: sizes_from_addresses {1000 * (sized - start):.0f} ms, "
        f"build_symbol_elf {1000 * (built - sized):.0f} ms, {len(data) / 1e6:.1f} MB"
    )
    path = tmp_path / "big"
    path.write_bytes(data)
    name, address, _ = kallsyms[100_000]
    start = time.perf_counter()
    out = gdb_batch(path, f"info symbol {address + 1:#x}", f"info address {name}")
    print(f"GDB load + 2 lookups: {time.perf_counter() - start:.2f} s")
    assert f"{name} + 1 in section .text" in out
    assert f"is at {address:#x}" in out
