"""QEMU's monitor output formats, byte for byte, for what vmigdb computes itself.

GEF and pwndbg recognise a QEMU system target and read its layout with `monitor info mem`,
`info tlb`, `info registers`, `xp`... and parse QEMU's text. vmigdb answers those commands from its
own page walk and register reads, in the formats of QEMU's target/i386/monitor.c,
target/i386/cpu-dump.c and monitor/hmp-cmds.c (QEMU 7.2), so those parsers work unchanged. Nothing
here talks to QEMU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vmigdb.arch.x86_64.pagemap import Leaf, canonical, regions
from vmigdb.arch.x86_64.paging import PagingMode
from vmigdb.arch.x86_64.registers import REGISTERS, RegisterFile

_PG_PSE = 1 << 7
_ALL = (1 << 64) - 1
# Which bits of a leaf entry `info tlb` prints as the frame, per paging mode and page size:
# QEMU's masks, quirks included (PAE 2M pages keep bit 20, legacy 4M pages keep bits 13..20).
_TLB_MASK = {
    PagingMode.LONG4: {0x1000: 0x3_FFFF_FFFF_F000, 0x20_0000: 0x3_FFFF_FFE0_0000,
                       0x4000_0000: 0x3_FFFF_C000_0000},
    PagingMode.PAE: {0x1000: _ALL ^ 0xFFF, 0x20_0000: _ALL ^ 0xF_FFFF},
    PagingMode.LEGACY32: {0x1000: _ALL ^ 0xFFF, 0x40_0000: _ALL ^ 0x1F_FFFF},
}  # fmt: skip
_TLB_MASK[PagingMode.LONG5] = _TLB_MASK[PagingMode.LONG4]
_TLB_FLAGS = (
    (63, "X"),
    (8, "G"),
    (7, "P"),
    (6, "D"),
    (5, "A"),
    (4, "C"),
    (3, "T"),
    (2, "U"),
    (1, "W"),
)


def _mode_width(mode: PagingMode) -> int:
    return {PagingMode.LONG5: 57, PagingMode.LONG4: 48}.get(mode, 32)


def _addr(value: int, mode: PagingMode) -> str:
    """QEMU prints addresses with TARGET_FMT_plx: 16 hex digits on x86-64, canonical."""
    return f"{canonical(value, mode) & ((1 << 64) - 1):016x}"


def info_mem(pages: Iterable[Leaf], mode: PagingMode) -> str:
    """`info mem`: ranges of equal (user, writable) permission, as QEMU merges them (NX is not
    shown). Each line: START-END SIZE [u-]r[w-]."""
    if mode is PagingMode.NONE:
        return "PG disabled"
    lines = [
        f"{_addr(r.start, mode)}-{_addr(r.end, mode)} {_addr(r.end - r.start, mode)} "
        f"{'u' if r.user else '-'}r{'w' if r.writable else '-'}"
        for r in regions(iter(pages), key=lambda leaf: (leaf.writable, leaf.user, False))
    ]
    return "\n".join(lines)


def info_tlb(pages: Iterable[Leaf], mode: PagingMode) -> str:
    """`info tlb`: one line per present page, its frame and the leaf entry's own flags."""
    if mode is PagingMode.NONE:
        return "PG disabled"
    lines = []
    for leaf in pages:
        entry = leaf.entry if leaf.size != 0x1000 else leaf.entry & ~_PG_PSE
        mask = _TLB_MASK[mode][leaf.size]
        flags = "".join(char if entry >> bit & 1 else "-" for bit, char in _TLB_FLAGS)
        lines.append(f"{_addr(leaf.va, mode)}: {entry & mask:016x} {flags}")
    return "\n".join(lines)


def _eflags(value: int) -> str:
    bits = ((10, "D"), (11, "O"), (7, "S"), (6, "Z"), (4, "A"), (2, "P"), (0, "C"))
    return "".join(char if value >> bit & 1 else "-" for bit, char in bits)


def info_registers(regs: RegisterFile) -> str:
    """`info registers`, the lines vmigdb knows exactly: the general registers, RIP and RFLAGS
    with the privilege level, the control registers and EFER. QEMU's segment caches, descriptor
    tables and debug registers are not in the gdbstub's register set, so those lines are left
    out rather than guessed (a parser looking for `IDT=` finds none); so is a line holding a
    register whose value is not known (a dump that did not save EFER)."""
    names = [
        ("RAX", "rax"), ("RBX", "rbx"), ("RCX", "rcx"), ("RDX", "rdx"),
        ("RSI", "rsi"), ("RDI", "rdi"), ("RBP", "rbp"), ("RSP", "rsp"),
        ("R8 ", "r8"), ("R9 ", "r9"), ("R10", "r10"), ("R11", "r11"),
        ("R12", "r12"), ("R13", "r13"), ("R14", "r14"), ("R15", "r15"),
    ]  # fmt: skip
    unknown = {REGISTERS[regnum].name for regnum in regs.unavailable}
    lines: list[str] = []

    def line(text: str, *uses: str) -> None:
        if not unknown.intersection(uses):
            lines.append(text)

    for i in range(0, 16, 4):
        row = names[i : i + 4]
        line(" ".join(f"{label}={regs[name]:016x}" for label, name in row), *(n for _, n in row))
    rflags = regs["eflags"]
    line(
        f"RIP={regs['rip']:016x} RFL={rflags:08x} [{_eflags(rflags)}] CPL={regs['cs'] & 3}",
        "rip", "eflags", "cs",
    )  # fmt: skip
    line(
        f"CR0={regs['cr0'] & 0xFFFF_FFFF:08x} CR2={regs['cr2']:016x} "
        f"CR3={regs['cr3']:016x} CR4={regs['cr4'] & 0xFFFF_FFFF:08x}",
        "cr0", "cr2", "cr3", "cr4",
    )  # fmt: skip
    line(f"EFER={regs['efer']:016x}", "efer")
    return "\n".join(lines)


class FormatError(ValueError):
    """A `/fmt` that QEMU would not take either; the message says why."""


class Formats:
    """QEMU's `/[count][format][size]` with its memory: a format or size left out is the one the
    previous `x`/`xp` used (QEMU starts with x and w), as QEMU's monitor does."""

    def __init__(self) -> None:
        self.format = "x"
        self.size = 4

    def parse(self, text: str | None) -> tuple[int, str, int]:
        """(count, format, size in bytes). With format c, count*size bytes print one by one."""
        if text is None:
            return 1, self.format, self.size
        if not text.startswith("/"):
            raise FormatError(f"invalid format {text!r}: expected /[count][format][size]")
        body = text[1:]
        digits = len(body) - len(body.lstrip("0123456789"))
        count = int(body[:digits]) if digits else 1
        fmt, size = self.format, self.size
        for char in body[digits:]:
            if char in "xduoc":
                fmt = char
            elif char in "bhwgL":
                size = {"b": 1, "h": 2, "w": 4, "g": 8, "L": 8}[char]
            elif char == "i":
                raise FormatError("the 'i' format is QEMU's disassembler: use GDB's x/i instead")
            else:
                raise FormatError(f"invalid char in format: '{char}'")
        self.format, self.size = fmt, size
        return count, fmt, size


def memory_dump(
    read: Callable[[int, int], bytes], addr: int, count: int, fmt: str, size: int
) -> str:
    """`x`/`xp`: lines of 8 bytes (16 for wider units), each `ADDR: v v ...` as QEMU prints
    them; `read(addr, n)` returns fewer bytes than asked where memory cannot be read, and the
    dump then ends with QEMU's ` Cannot access memory`."""
    remaining = count * size
    line_size = 8 if size == 1 else 16
    if fmt == "c":
        size = 1  # QEMU counts c by the remembered size, then prints single bytes
    digits = {
        "o": -(-size * 8 // 3),
        "x": size * 2,
        "u": -(-size * 80 // 33),
        "d": -(-size * 80 // 33),
    }
    lines = []
    while remaining > 0:
        chunk = min(remaining, line_size)
        data = read(addr, chunk)
        head = f"{addr & ((1 << 64) - 1):016x}:"
        if len(data) < chunk:
            lines.append(head + " Cannot access memory")
            break
        values = []
        for i in range(0, chunk, size):
            v = int.from_bytes(data[i : i + size], "little")
            width = digits.get(fmt, 0)
            if fmt == "x":
                values.append(f"0x{v:0{width}x}")
            elif fmt == "o":
                values.append(f"{'0' + format(v, 'o') if v else '0':>{width}}")
            elif fmt == "u":
                values.append(f"{v:>{width}}")
            elif fmt == "d":
                signed = v - (1 << (8 * size)) if v >> (8 * size - 1) else v
                values.append(f"{signed:>{width}}")
            else:  # c
                values.append(_printc(v))
        lines.append(head + "".join(" " + value for value in values))
        addr += chunk
        remaining -= chunk
    return "\n".join(lines)


def _printc(value: int) -> str:
    """QEMU's monitor_printc: a quoted character, escaped like C."""
    escapes = {0x27: "\\'", 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r"}
    if value in escapes:
        return f"'{escapes[value]}'"
    if 32 <= value <= 126:
        return f"'{chr(value)}'"
    return f"'\\x{value:02x}'"
