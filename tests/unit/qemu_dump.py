"""Small ELF dumps laid out byte for byte as QEMU's ``dump-guest-memory`` writes them.

Written from QEMU's C structures (dump/dump.c, target/i386/arch_dump.c), independently of the
reader under test: ELF64 header (with QEMU 7.2's e_ehsize of 8), PT_NOTE first then one PT_LOAD
per RAM block with the data packed back to back after the notes; notes: every vCPU's "CORE"
NT_PRSTATUS (x86_64 ``struct elf_prstatus``, pr_pid = index + 1), then every vCPU's "QEMU" note
(``QEMUCPUState`` v1 + kernel_gs_base), then optionally "VMCOREINFO".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

EM_X86_64 = 62
EM_386 = 3
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp") + tuple(
    f"r{i}" for i in range(8, 16)
)
CS64_FLAGS = 0x00A09B00  # QEMU's descriptor flags word for a 64-bit kernel CS (L=1)
DS_FLAGS = 0x00C09300


@dataclass
class Cpu:
    """One vCPU's state, as QEMU's CPUX86State would hold it."""

    gprs: dict[str, int] = field(default_factory=dict)
    rip: int = 0
    rflags: int = 0x2
    # name -> (selector, limit, flags, base)
    segments: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    cr: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    kernel_gs_base: int = 0

    def segment(self, name: str) -> tuple[int, int, int, int]:
        return self.segments.get(name, (0, 0, 0, 0))


def kernel_cpu(n: int, cr3: int = 0x10_A000) -> Cpu:
    """A vCPU in the middle of a 64-bit Linux kernel, values distinct per register and vCPU."""
    gprs = {name: 0xFFFF_8880_0000_0000 + n * 0x1000 + i * 8 for i, name in enumerate(GPRS)}
    return Cpu(
        gprs=gprs,
        rip=0xFFFF_FFFF_8100_0000 + n * 0x10,
        rflags=0x246,
        segments={
            "cs": (0x10, 0xFFFF_FFFF, CS64_FLAGS, 0),
            "ss": (0x18, 0xFFFF_FFFF, DS_FLAGS, 0),
            "fs": (0, 0, 0, 0x7F00_0000_0000 + n),
            "gs": (0, 0, 0, 0xFFFF_8880_1F20_0000 + n * 0x10_0000),
            "tr": (0x40, 0x4087, 0x8900, 0xFFFF_FE00_0000_3000),
            "gdt": (0, 0x7F, 0, 0xFFFF_FE00_0000_1000),
            "idt": (0, 0xFFF, 0, 0xFFFF_FE00_0000_0000),
        },
        cr=(0x8005_0033, 0, 0x7F00_DEAD_0000 + n, cr3, 0x6B0),
        kernel_gs_base=0x7F12_3456_0000 + n,
    )


def note(name: bytes, n_type: int, desc: bytes) -> bytes:
    """An Elf64_Nhdr note as QEMU builds it: name and desc each padded to 4 bytes."""
    namesz = len(name) + 1
    out = struct.pack("<III", namesz, len(desc), n_type)
    out += (name + b"\0").ljust((namesz + 3) // 4 * 4, b"\0")
    out += desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    return out


def prstatus64(cpu: Cpu, pid: int) -> bytes:
    """x86_64_elf_prstatus: pad1[32], pid, pad2[76], x86_64_user_regs_struct, pad3[8]."""
    g = cpu.gprs
    sel = {n: cpu.segment(n)[0] for n in ("cs", "ss", "ds", "es", "fs", "gs")}
    regs = struct.pack(
        "<27Q",
        g.get("r15", 0), g.get("r14", 0), g.get("r13", 0), g.get("r12", 0),
        g.get("rbp", 0), g.get("rbx", 0), g.get("r11", 0), g.get("r10", 0),
        g.get("r9", 0), g.get("r8", 0), g.get("rax", 0), g.get("rcx", 0),
        g.get("rdx", 0), g.get("rsi", 0), g.get("rdi", 0), 0,  # orig_rax: QEMU writes 0
        cpu.rip, sel["cs"], cpu.rflags, g.get("rsp", 0), sel["ss"],
        cpu.segment("fs")[3], cpu.segment("gs")[3],
        sel["ds"], sel["es"], sel["fs"], sel["gs"],
    )  # fmt: skip
    desc = bytes(32) + struct.pack("<I", pid) + bytes(76) + regs + bytes(8)
    assert len(desc) == 336
    return desc


def prstatus32(cpu: Cpu, pid: int) -> bytes:
    """x86_elf_prstatus: pad1[24], pid, pad2[44], x86_user_regs_struct (68 bytes), pad3[4]."""
    g = {k: v & 0xFFFF_FFFF for k, v in cpu.gprs.items()}
    sel = {n: cpu.segment(n)[0] for n in ("cs", "ss", "ds", "es", "fs", "gs")}
    regs = struct.pack(
        "<7I8H2I2H2I2H",
        g.get("rbx", 0), g.get("rcx", 0), g.get("rdx", 0), g.get("rsi", 0),
        g.get("rdi", 0), g.get("rbp", 0), g.get("rax", 0),
        sel["ds"], 0, sel["es"], 0, sel["fs"], 0, sel["gs"], 0,
        0, cpu.rip & 0xFFFF_FFFF, sel["cs"], 0, cpu.rflags & 0xFFFF_FFFF, g.get("rsp", 0),
        sel["ss"], 0,
    )  # fmt: skip
    desc = bytes(24) + struct.pack("<I", pid) + bytes(44) + regs + bytes(4)
    assert len(desc) == 144
    return desc


def qemu_cpustate(cpu: Cpu, *, with_kernel_gs_base: bool = True, version: int = 1) -> bytes:
    """struct QEMUCPUState: version, size, 16 GPRs, rip, rflags, 10 QEMUCPUSegment, cr[5],
    kernel_gs_base (QEMU >= 5.2)."""
    size = 432 + (8 if with_kernel_gs_base else 0)
    out = struct.pack("<II", version, size)
    out += struct.pack("<16Q", *(cpu.gprs.get(n, 0) for n in GPRS))
    out += struct.pack("<QQ", cpu.rip, cpu.rflags)
    for name in SEGMENTS:
        selector, limit, flags, base = cpu.segment(name)
        out += struct.pack("<IIIIQ", selector, limit, flags, 0, base)
    out += struct.pack("<5Q", *cpu.cr)
    if with_kernel_gs_base:
        out += struct.pack("<Q", cpu.kernel_gs_base)
    assert len(out) == size
    return out


def write_core(
    path: Path,
    blocks: list[tuple[int, bytes]],
    cpus: list[Cpu],
    *,
    machine: int = EM_X86_64,
    prstatus: bool = True,
    qemu_notes: bool = True,
    qemu_note_kgs: bool = True,
    qemu_note_version: int = 1,
    vmcoreinfo: bytes | None = None,
    pn_xnum: bool = False,
    e_type: int = 4,
) -> Path:
    """Write an ELF dump of RAM *blocks* ``(paddr, data)`` and *cpus*, as QEMU would."""
    notes = b""
    if prstatus:
        for i, cpu in enumerate(cpus):
            desc = prstatus64(cpu, i + 1) if machine == EM_X86_64 else prstatus32(cpu, i + 1)
            notes += note(b"CORE", 1, desc)
    if qemu_notes:
        for cpu in cpus:
            desc = qemu_cpustate(cpu, with_kernel_gs_base=qemu_note_kgs, version=qemu_note_version)
            notes += note(b"QEMU", 0, desc)
    if vmcoreinfo is not None:
        notes += note(b"VMCOREINFO", 0, vmcoreinfo)

    phnum = 1 + len(blocks)
    shnum = 1 if pn_xnum else 0
    phoff = 64 + 64 * shnum
    data_at = phoff + 56 * phnum + len(notes)
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, phoff + 56 * phnum, 0, 0, len(notes), len(notes), 0)
    offset = data_at
    for paddr, data in blocks:
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, offset, paddr, paddr, len(data), len(data), 0)
        offset += len(data)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    e_phnum = 0xFFFF if pn_xnum else phnum
    # e_ehsize 8: QEMU 7.2 writes sizeof(a pointer) there.
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, 0, phoff, 64 if pn_xnum else 0, 0,
        8, 56, e_phnum, 64 if pn_xnum else 0, shnum, 0,
    )  # fmt: skip
    shdrs = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0) if pn_xnum else b""
    with open(path, "wb") as f:
        f.write(ehdr + shdrs + phdrs + notes)
        for _, data in blocks:
            f.write(data)
    return path


def write_sparse_core(
    path: Path, layout: list[tuple[int, int]], pieces: dict[int, bytes], cpus: list[Cpu]
) -> Path:
    """A dump of RAM blocks ``(paddr, size)`` that costs no disk: zeros are holes in the file.

    *pieces* maps guest-physical addresses to the bytes there (each inside one block).
    """
    notes = b"".join(note(b"CORE", 1, prstatus64(c, i + 1)) for i, c in enumerate(cpus))
    notes += b"".join(note(b"QEMU", 0, qemu_cpustate(c)) for c in cpus)
    phnum = 1 + len(layout)
    phoff = 64
    offset = phoff + 56 * phnum + len(notes)
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, phoff + 56 * phnum, 0, 0, len(notes), len(notes), 0)
    where = {}
    for paddr, size in layout:
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, offset, paddr, paddr, size, size, 0)
        where[paddr] = (offset, size)
        offset += size
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 4, EM_X86_64, 1, 0, phoff, 0, 0, 8, 56, phnum, 0, 0, 0
    )
    with open(path, "wb") as f:
        f.write(ehdr + phdrs + notes)
        f.truncate(offset)
        for pa, data in pieces.items():
            base = max(p for p in where if p <= pa)
            file_offset, size = where[base]
            assert pa + len(data) <= base + size
            f.seek(file_offset + pa - base)
            f.write(data)
    return path
