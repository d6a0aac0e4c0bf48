"""Each vCPU's registers from a QEMU dump's notes, as the `RegisterFile` GDB is served.

QEMU writes two notes per vCPU (target/i386/arch_dump.c, unchanged from 7.2 to 10.x):

- "CORE" NT_PRSTATUS, Linux's ``struct elf_prstatus`` for x86-64 (336 bytes: ``pr_pid`` at 32 is
  the vCPU's ``cpu_index + 1``, the 27 ``user_regs_struct`` words at 112) or, when the first vCPU
  is not in long mode, the i386 one (144 bytes: ``pr_pid`` at 24, 17 words at 72). General
  registers, rip, eflags, selectors, fs/gs bases: no control registers.
- "QEMU", type 0, ``QEMUCPUState`` version 1: ``version, size`` (u32), rax..r15, rip, rflags (u64),
  cs ds es fs gs ss ldt tr gdt idt as ``{u32 selector, limit, flags, pad; u64 base}``, ``cr[5]``,
  then fields appended without a version bump, found by ``size``: ``kernel_gs_base`` (QEMU >= 5.2,
  so in 7.2 and 10.x: 440 bytes). ``flags`` is QEMU's descriptor cache word: bit 21 is L (64-bit
  code), bit 22 D/B.

Neither note holds x87/SSE state, CR8, EFER or the debug registers: those are listed as absent,
and GDB shows them as <unavailable> (they read 0 inside vmigdb). For vmigdb's own page walk only,
EFER's LME/LMA are derived (GDB still shows EFER as unavailable): long mode is active when paging
and PAE are on and the vCPU runs 64-bit code (CS.L) or QEMU marked the dump EM_X86_64 (its first
vCPU had EFER.LMA set); SCE and NXE cannot be known and read 0.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.hv.libvmi.elfcore import EM_X86_64, Note

__all__ = [
    "CPUSTATE_SIZE_MIN",
    "PrStatus",
    "QemuCpuState",
    "Segment",
    "VcpuState",
    "derive_efer",
    "page_table_registers",
    "parse_prstatus",
    "parse_qemu_cpustate",
    "vcpu_states",
]

log = logging.getLogger("vmigdb.hv.libvmi")

NT_PRSTATUS = 1
_SEGMENT = struct.Struct("<IIIIQ")
_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp") + tuple(
    f"r{i}" for i in range(8, 16)
)
CPUSTATE_SIZE_MIN = 8 + 18 * 8 + 10 * _SEGMENT.size + 5 * 8  # 432: version 1 without extensions
_KGS_OFFSET = CPUSTATE_SIZE_MIN  # kernel_gs_base, the first appended field

# x86_64 struct elf_prstatus: pr_pid at 32, user_regs_struct at 112, 336 bytes in all.
_PRSTATUS64_SIZE = 336
_USER_REGS64 = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
    "fs_base gs_base ds es fs gs"
).split()
# i386 struct elf_prstatus: pr_pid at 24, user_regs_struct at 72, 144 bytes in all.
_PRSTATUS32_SIZE = 144
_USER_REGS32 = struct.Struct("<7I8H2I2H2I2H")
_USER_REGS32_NAMES = (
    "ebx ecx edx esi edi ebp eax ds _ es _ fs _ gs _ orig_eax eip cs _ eflags esp ss _".split()
)

_DESC_L = 1 << 21
_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_CR4_LA57 = 1 << 12
_EFER_LME = 1 << 8
_EFER_LMA = 1 << 10

_X87 = tuple(f"st{i}" for i in range(8)) + (
    "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop",
)  # fmt: skip
_SSE = tuple(f"xmm{i}" for i in range(16)) + ("mxcsr",)
ABSENT_FROM_QEMU_NOTE = (*_X87, *_SSE, "cr8")
"""Registers no QEMU dump holds (7.2 to 10.x)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register as QEMU caches it: selector, limit, descriptor flags word, base."""

    selector: int
    limit: int
    flags: int
    base: int

    @property
    def long(self) -> bool:
        """The L bit: 64-bit code (meaningful for CS)."""
        return bool(self.flags & _DESC_L)


@dataclass(frozen=True)
class QemuCpuState:
    """One "QEMU" note (``QEMUCPUState``).

    :ivar gprs: rax..r15 by name.
    :ivar segments: cs, ds, es, fs, gs, ss, ldt, tr, gdt, idt by name.
    :ivar cr: cr0..cr4 (cr1 is always 0).
    :ivar kernel_gs_base: The KERNEL_GS_BASE MSR, or None if the note is too old to hold it.
    """

    version: int
    size: int
    gprs: dict[str, int]
    rip: int
    rflags: int
    segments: dict[str, Segment]
    cr: tuple[int, int, int, int, int]
    kernel_gs_base: int | None


@dataclass(frozen=True)
class PrStatus:
    """One NT_PRSTATUS note: ``pr_pid`` (QEMU puts the vCPU's index + 1 there) and its registers
    under ``user_regs_struct``'s names."""

    pid: int
    regs: dict[str, int]
    bits: int  # 64 or 32: which struct elf_prstatus it was


def parse_qemu_cpustate(desc: bytes) -> QemuCpuState:
    """Decode a "QEMU" note's descriptor.

    :raises ValueError: if it is shorter than version 1's 432 bytes, its ``size`` disagrees with
        its length, or its version is not 1 (QEMU bumps it only on incompatible changes).
    """
    if len(desc) < 8:
        raise ValueError(f"QEMU note of {len(desc)} bytes")
    version, size = struct.unpack_from("<II", desc)
    if version != 1:
        raise ValueError(f"QEMUCPUState version {version}; vmigdb knows version 1")
    if size < CPUSTATE_SIZE_MIN or size > len(desc):
        raise ValueError(f"QEMUCPUState of {size} bytes in a note of {len(desc)}")
    words = struct.unpack_from("<18Q", desc, 8)
    gprs = dict(zip(_GPR_ORDER, words[:16], strict=True))
    pos = 8 + 18 * 8
    segments = {}
    for name in _SEGMENT_NAMES:
        selector, limit, flags, _pad, base = _SEGMENT.unpack_from(desc, pos)
        segments[name] = Segment(selector, limit, flags, base)
        pos += _SEGMENT.size
    cr = struct.unpack_from("<5Q", desc, pos)
    kgs = struct.unpack_from("<Q", desc, _KGS_OFFSET)[0] if size >= _KGS_OFFSET + 8 else None
    return QemuCpuState(version, size, gprs, words[16], words[17], segments, cr, kgs)


def parse_prstatus(desc: bytes) -> PrStatus:
    """Decode an NT_PRSTATUS descriptor (x86-64 or i386 ``struct elf_prstatus``, told by size).

    :raises ValueError: if it is neither size.
    """
    if len(desc) == _PRSTATUS64_SIZE:
        pid = struct.unpack_from("<I", desc, 32)[0]
        words = struct.unpack_from(f"<{len(_USER_REGS64)}Q", desc, 112)
        return PrStatus(pid, dict(zip(_USER_REGS64, words, strict=True)), 64)
    if len(desc) == _PRSTATUS32_SIZE:
        pid = struct.unpack_from("<I", desc, 24)[0]
        words = _USER_REGS32.unpack_from(desc, 72)
        regs = {n: v for n, v in zip(_USER_REGS32_NAMES, words, strict=True) if n != "_"}
        return PrStatus(pid, regs, 32)
    raise ValueError(f"NT_PRSTATUS of {len(desc)} bytes (x86-64's is 336, i386's 144)")


def derive_efer(cr0: int, cr4: int, cs_long: bool, dump_is_64bit: bool) -> int:
    """EFER.LME|LMA when the vCPU is in long mode as far as CR0, CR4 and CS tell; else 0.

    Paging with PAE is long mode or 32-bit PAE paging; in a dump QEMU marked EM_X86_64 (its first
    vCPU was in long mode) or with CS.L set it is taken as long mode.
    """
    if cr0 & _CR0_PG and cr4 & _CR4_PAE and (cs_long or dump_is_64bit):
        return _EFER_LME | _EFER_LMA
    return 0


@dataclass(frozen=True)
class VcpuState:
    """One vCPU as the dump saved it.

    :ivar number: 1-based, as GDB's thread ids and QEMU's gdbstub number vCPUs.
    :ivar registers: What GDB is served; a register the dump did not save (absent or derived)
        is in ``registers.unavailable``: GDB shows <unavailable>, vmigdb's page walk reads the
        derived value (or 0).
    :ivar source: Which note(s) the registers came from.
    :ivar absent: Registers the dump does not hold.
    :ivar derived: Registers computed from others, for vmigdb's page walk, each with how.
    """

    number: int
    registers: RegisterFile
    source: str
    absent: tuple[str, ...]
    derived: tuple[str, ...]

    @property
    def has_page_tables(self) -> bool:
        """Whether the dump gave this vCPU's CR3."""
        return "cr3" not in self.absent


def _from_cpustate(number: int, st: QemuCpuState, dump_is_64bit: bool) -> VcpuState:
    seg = st.segments
    values = dict(st.gprs)
    values.update(rip=st.rip, eflags=st.rflags & 0xFFFF_FFFF)
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        values[name] = seg[name].selector & 0xFFFF
    values.update(fs_base=seg["fs"].base, gs_base=seg["gs"].base)
    values.update(cr0=st.cr[0], cr2=st.cr[2], cr3=st.cr[3], cr4=st.cr[4])
    absent = list(ABSENT_FROM_QEMU_NOTE)
    if st.kernel_gs_base is None:
        absent.append("k_gs_base")
    else:
        values["k_gs_base"] = st.kernel_gs_base
    values["efer"] = derive_efer(st.cr[0], st.cr[4], seg["cs"].long, dump_is_64bit)
    derived = ("efer, for vmigdb's page walk: LME/LMA from CR0.PG, CR4.PAE and CS.L; SCE, NXE 0",)
    source = f"QEMU note (QEMUCPUState v{st.version}, {st.size} bytes)"
    registers = RegisterFile.from_values(values, seg["cs"].long, (*absent, "efer"))
    return VcpuState(number, registers, source, tuple(absent), derived)


def _from_prstatus(number: int, pr: PrStatus) -> VcpuState:
    r = pr.regs
    if pr.bits == 64:
        values = {n: r[n] for n in _GPR_ORDER}
        values.update(rip=r["rip"], fs_base=r["fs_base"], gs_base=r["gs_base"])
    else:
        values = {
            "r" + n[1:]: r[n] for n in ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp")
        }
        values["rip"] = r["eip"]
    values["eflags"] = r["eflags"] & 0xFFFF_FFFF
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        values[name] = r[name] & 0xFFFF
    absent = (*ABSENT_FROM_QEMU_NOTE, "cr0", "cr2", "cr3", "cr4", "efer", "k_gs_base")
    if pr.bits == 32:
        absent += ("fs_base", "gs_base")
    registers = RegisterFile.from_values(values, pr.bits == 64, absent)
    return VcpuState(number, registers, f"NT_PRSTATUS ({pr.bits}-bit)", absent, ())


def vcpu_states(notes: Sequence[Note], machine: int) -> list[VcpuState]:
    """Every vCPU in a dump's notes, numbered as QEMU numbers them (``pr_pid``).

    QEMU writes all NT_PRSTATUS notes, then all "QEMU" notes in the same vCPU order, so the i-th of
    each describe the same vCPU. The "QEMU" note is used where it is readable (it has the control
    registers); NT_PRSTATUS otherwise.

    :raises ValueError: if there is no usable note for any vCPU.
    """
    prstatus: list[PrStatus] = []
    cpustates: list[QemuCpuState | None] = []
    for note in notes:
        if note.name == "CORE" and note.type == NT_PRSTATUS:
            try:
                prstatus.append(parse_prstatus(note.desc))
            except ValueError as e:
                log.warning("skipping a dump note: %s", e)
        elif note.name == "QEMU" and note.type == 0:
            try:
                cpustates.append(parse_qemu_cpustate(note.desc))
            except ValueError as e:
                log.warning("skipping a dump note: %s", e)
                cpustates.append(None)
    if prstatus and cpustates and len(prstatus) != len(cpustates):
        log.warning(
            "%d NT_PRSTATUS notes but %d QEMU notes: using the QEMU notes alone",
            len(prstatus),
            len(cpustates),
        )
        prstatus = []
    count = max(len(prstatus), len(cpustates))
    if not count:
        raise ValueError("no vCPU notes (NT_PRSTATUS or QEMU)")
    out = []
    is_64 = machine == EM_X86_64
    for i in range(count):
        pr = prstatus[i] if i < len(prstatus) else None
        st = cpustates[i] if i < len(cpustates) else None
        number = pr.pid if pr is not None and pr.pid > 0 else i + 1
        if st is not None:
            out.append(_from_cpustate(number, st, is_64))
        elif pr is not None:
            out.append(_from_prstatus(number, pr))
    if not out:
        raise ValueError("no readable vCPU note")
    if len({v.number for v in out}) != len(out):  # pr_pid is not QEMU's numbering after all
        out = [_renumber(v, i + 1) for i, v in enumerate(out)]
    return out


def _renumber(v: VcpuState, number: int) -> VcpuState:
    return VcpuState(number, v.registers, v.source, v.absent, v.derived)


def page_table_registers(cr3: int, la57: bool = False) -> VcpuState:
    """A stand-in vCPU for an image without registers: the kernel's page tables and nothing else.

    CR0.PE|PG, CR4.PAE (and LA57), EFER.LME|LMA and CR3: enough for virtual addresses to translate
    as they did in the kernel. Every other register is unknown (0).
    """
    values = {
        "cr0": 1 | _CR0_PG,
        "cr3": cr3,
        "cr4": _CR4_PAE | (_CR4_LA57 if la57 else 0),
        "efer": _EFER_LME | _EFER_LMA,
    }
    names = RegisterFile.from_values({}).values()
    absent = tuple(r for r in names if r not in values)
    registers = RegisterFile.from_values(values, True, names)  # GDB is shown none of them
    derived = (
        "cr0/cr3/cr4/efer: the kernel's page tables (init_top_pgt), found from VMCOREINFO in RAM",
    )
    return VcpuState(1, registers, "the kernel's page tables (no registers)", absent, derived)
