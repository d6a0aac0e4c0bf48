"""Reading QEMU ELF dumps: segments, notes, and each vCPU's registers as GDB will see them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.qemu_dump import EM_386, Cpu, kernel_cpu, write_core
from vmigdb.hv.libvmi.cpustate import ABSENT_FROM_QEMU_NOTE, vcpu_states
from vmigdb.hv.libvmi.elfcore import DumpFormatError, ElfCore, read_elf_core

BLOCKS = [(0, b"\x11" * 0xA0000), (0xC0000, b"\x22" * 0x40000), (0x100000, b"\x33" * 0x100000)]


def parse(path: Path) -> ElfCore:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_elf_core(fd, path)
    finally:
        os.close(fd)


def test_segments_and_ram_ranges(tmp_path) -> None:
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)]))
    assert [(s.paddr, s.memsz) for s in core.loads] == [(p, len(d)) for p, d in BLOCKS]
    # 0xc0000-0x100000 touches 0x100000: one range; the VGA hole stays a hole.
    assert core.ram_ranges() == [(0, 0xA0000), (0xC0000, 0x200000)]
    first = core.loads[0]
    with open(tmp_path / "d.elf", "rb") as f:
        f.seek(core.loads[1].offset)
        assert f.read(4) == b"\x22" * 4
    assert first.filesz == first.memsz


def test_pn_xnum_program_header_count(tmp_path) -> None:
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)], pn_xnum=True))
    assert len(core.loads) == 3


def test_vmcoreinfo_note(tmp_path) -> None:
    text = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)], vmcoreinfo=text + b"\0"))
    assert core.vmcoreinfo == text


def test_registers_from_qemu_notes(tmp_path) -> None:
    cpus = [kernel_cpu(0, cr3=0x10A000), kernel_cpu(1, cr3=0x2345000)]
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, cpus))
    states = vcpu_states(core.notes, core.machine)
    assert [v.number for v in states] == [1, 2]
    for cpu, state in zip(cpus, states, strict=True):
        regs = state.registers
        for name, value in cpu.gprs.items():
            assert regs[name] == value, name
        assert regs["rip"] == cpu.rip
        assert regs["eflags"] == 0x246
        assert regs["cs"] == 0x10 and regs["ss"] == 0x18
        assert regs["fs_base"] == cpu.segments["fs"][3]
        assert regs["gs_base"] == cpu.segments["gs"][3]
        assert regs["k_gs_base"] == cpu.kernel_gs_base
        assert (regs["cr0"], regs["cr2"], regs["cr3"], regs["cr4"]) == (
            cpu.cr[0],
            cpu.cr[2],
            cpu.cr[3],
            cpu.cr[4],
        )
        assert regs["efer"] == 0x500  # LME|LMA derived: paging, PAE, CS.L
        assert regs.long_mode
        assert state.has_page_tables
        assert set(state.absent) == set(ABSENT_FROM_QEMU_NOTE)
        assert "440 bytes" in state.source


def test_old_qemu_note_without_kernel_gs_base(tmp_path) -> None:
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)], qemu_note_kgs=False))
    (state,) = vcpu_states(core.notes, core.machine)
    assert "k_gs_base" in state.absent
    assert state.registers["k_gs_base"] == 0
    assert state.registers["cr3"] == 0x10A000


def test_unknown_qemu_note_version_falls_back_to_prstatus(tmp_path) -> None:
    cpu = kernel_cpu(0)
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [cpu], qemu_note_version=2))
    (state,) = vcpu_states(core.notes, core.machine)
    assert state.source.startswith("NT_PRSTATUS")
    assert state.registers["rip"] == cpu.rip
    assert state.registers["r15"] == cpu.gprs["r15"]
    assert state.registers["gs_base"] == cpu.segments["gs"][3]
    assert not state.has_page_tables and state.registers["cr3"] == 0


def test_prstatus_only_dump(tmp_path) -> None:
    cpus = [kernel_cpu(0), kernel_cpu(1)]
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, cpus, qemu_notes=False))
    states = vcpu_states(core.notes, core.machine)
    assert [v.registers["rsp"] for v in states] == [c.gprs["rsp"] for c in cpus]
    assert all("cr3" in v.absent and "efer" in v.absent for v in states)


def test_i386_prstatus(tmp_path) -> None:
    cpu = Cpu(gprs={"rax": 0x1234, "rsp": 0x8000}, rip=0x7C00, segments={"cs": (8, 0, 0, 0)})
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [cpu], machine=EM_386, qemu_notes=False))
    (state,) = vcpu_states(core.notes, core.machine)
    assert state.registers["rax"] == 0x1234 and state.registers["rip"] == 0x7C00
    assert state.registers["cs"] == 8
    assert not state.registers.long_mode


def test_vcpu_not_in_long_mode(tmp_path) -> None:
    """An AP still in real mode: no paging, so no EFER.LMA whatever the dump's machine."""
    ap = Cpu(
        rip=0xFFF0, segments={"cs": (0xF000, 0xFFFF, 0x9B00, 0xFFFF0000)}, cr=(0x10, 0, 0, 0, 0)
    )
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0), ap]))
    states = vcpu_states(core.notes, core.machine)
    assert states[1].registers["efer"] == 0
    assert states[1].registers["cs"] == 0xF000
    assert not states[1].registers.long_mode


def test_compatibility_mode_keeps_lma(tmp_path) -> None:
    """A 32-bit process under a 64-bit kernel: CS.L clear, still long mode (EM_X86_64 dump)."""
    cpu = kernel_cpu(0)
    cpu.segments["cs"] = (0x23, 0xFFFFFFFF, 0x00CFFB00, 0)
    core = parse(write_core(tmp_path / "d.elf", BLOCKS, [cpu]))
    (state,) = vcpu_states(core.notes, core.machine)
    assert state.registers["efer"] == 0x500
    assert not state.registers.long_mode


# -- bad input: one clear error each ---------------------------------------------------------


def test_truncated_dump(tmp_path) -> None:
    path = write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)])
    os.truncate(path, path.stat().st_size - 4096)
    with pytest.raises(DumpFormatError, match=r"is truncated: guest-physical 0x100000-0x200000"):
        parse(path)


def test_truncated_headers(tmp_path) -> None:
    path = write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)])
    for size in (40, 100, 300):
        os.truncate(path, size)
        with pytest.raises(DumpFormatError, match="truncated"):
            parse(path)


def test_not_a_dump(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    with pytest.raises(DumpFormatError, match="is not an ELF core dump"):
        parse(text)
    kdump = tmp_path / "k.dump"
    kdump.write_bytes(b"KDUMP   " + bytes(4096))
    with pytest.raises(DumpFormatError, match="kdump-compressed"):
        parse(kdump)


def test_elf_but_not_core(tmp_path) -> None:
    path = write_core(tmp_path / "exe", BLOCKS, [kernel_cpu(0)], e_type=2)
    with pytest.raises(DumpFormatError, match=r"not a core dump \(e_type 2\)"):
        parse(path)


def test_elf32_is_refused(tmp_path) -> None:
    path = write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)])
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(b"\x01")
    with pytest.raises(DumpFormatError, match="32-bit ELF dump"):
        parse(path)


def test_overlapping_segments(tmp_path) -> None:
    blocks = [(0, bytes(0x2000)), (0x1000, bytes(0x1000))]
    with pytest.raises(DumpFormatError, match="overlap at guest-physical 0x1000"):
        parse(write_core(tmp_path / "d.elf", blocks, [kernel_cpu(0)]))


def test_no_vcpu_notes(tmp_path) -> None:
    core = parse(
        write_core(tmp_path / "d.elf", BLOCKS, [kernel_cpu(0)], prstatus=False, qemu_notes=False)
    )
    with pytest.raises(ValueError, match="no vCPU notes"):
        vcpu_states(core.notes, core.machine)
