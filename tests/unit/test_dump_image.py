"""Opening saved guests through libvmi's File driver: ELF dumps, raw images, registers files, and
the read-only driver on top. Every read here is a real ``vmi_read_pa`` on a real file."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tests.unit.qemu_dump import kernel_cpu, write_core
from vmigdb.arch.x86_64.paging import PagingMode, PhysicalMemoryError, Translation, translate
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.errors import SetupError
from vmigdb.hv.base import BreakpointType, DriverError, Unsupported
from vmigdb.hv.libvmi import DumpDriver, DumpFormatError, open_image
from vmigdb.hv.libvmi.regsfile import read_registers_file, write_registers_file

MiB = 1 << 20
PML4 = 0x1000
KERNEL_VA = 0xFFFF_FFFF_8100_0000
KERNEL_PA = 0x20_0000
DIRECT_VA = 0xFFFF_8880_0000_0000


def page_tables(ram: bytearray) -> None:
    """4-level tables at PML4: KERNEL_VA -> KERNEL_PA (4K page), DIRECT_VA -> 0 (a 2M page)."""

    def entry(table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", ram, table + 8 * index, value)

    entry(PML4, 511, 0x2000 | 3)
    entry(0x2000, 510, 0x3000 | 3)
    entry(0x3000, 8, 0x4000 | 3)
    entry(0x4000, 0, KERNEL_PA | 3)
    entry(PML4, 273, 0x5000 | 3)  # 0xffff888000000000: PML4 index 273
    entry(0x5000, 0, 0x6000 | 3)
    entry(0x6000, 0, 0 | 0x83)  # PS: 2 MiB page at 0


def guest_ram(size: int = 4 * MiB) -> bytearray:
    ram = bytearray(size)
    page_tables(ram)
    ram[KERNEL_PA : KERNEL_PA + 16] = b"kernel text here"
    ram[size - 16 :] = b"last bytes of RM"
    for pa in range(0x100000, 0x180000, 4096):  # a non-zero stretch, not page tables
        ram[pa + 8 : pa + 16] = pa.to_bytes(8, "little")
    return ram


@pytest.fixture
def elf_dump(tmp_path) -> tuple[Path, bytearray]:
    ram = guest_ram()
    blocks = [(0, bytes(ram[:0xA0000])), (0xC0000, bytes(ram[0xC0000:]))]
    cpus = [kernel_cpu(0, cr3=PML4), kernel_cpu(1, cr3=PML4)]
    return write_core(tmp_path / "guest.elf", blocks, cpus), ram


def test_elf_dump_memory_and_registers(elf_dump, capfd) -> None:
    path, ram = elf_dump
    with open_image(path) as image:
        assert image.cpus() == [1, 2]
        assert image.ranges() == [(0, 0xA0000), (0xC0000, 4 * MiB)]
        assert image.read(KERNEL_PA, 16) == b"kernel text here"
        assert image.read(0xC0000, len(ram) - 0xC0000) == bytes(ram[0xC0000:])
        assert image.read(4 * MiB - 16, 16) == b"last bytes of RM"  # the last page of RAM
        regs = image.registers(2)
        assert regs["rip"] == kernel_cpu(1).rip and regs["cr3"] == PML4
        # vmigdb's page walk over libvmi's reads, and libvmi's own walk, agree.
        t = translate(image.read, regs["cr3"], KERNEL_VA + 0x10, PagingMode.LONG4)
        assert isinstance(t, Translation) and t.pa == KERNEL_PA + 0x10
        assert image.memory.translate(PML4, KERNEL_VA + 0x10) == KERNEL_PA + 0x10
        assert image.memory.translate(PML4, DIRECT_VA + 0x123456) == 0x123456
        assert image.memory.translate(PML4, 0x400000) is None
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # libvmi's expected complaints are not shown


def test_reads_outside_ram(elf_dump) -> None:
    path, _ = elf_dump
    with open_image(path) as image:
        with pytest.raises(PhysicalMemoryError) as e:
            image.read(0xA0000, 8)  # the VGA hole: not in the dump
        assert e.value.address == 0xA0000
        with pytest.raises(PhysicalMemoryError) as e:
            image.read(0x9F000, 0x2000)  # runs off the end of low RAM
        assert e.value.address == 0xA0000
        with pytest.raises(PhysicalMemoryError) as e:
            image.read(4 * MiB - 8, 16)  # past the end of RAM
        assert e.value.address == 4 * MiB
        with pytest.raises(PhysicalMemoryError):
            image.read(1 << 40, 1)


def test_driver_serves_reads_and_refuses_the_rest(elf_dump) -> None:
    path, ram = elf_dump
    driver = DumpDriver.open(path)
    try:
        caps = driver.capabilities
        assert caps.memory_write is None and caps.sw_breakpoint is None
        assert caps.hw_breakpoint is None and caps.watchpoint is None and caps.single_step is None
        assert not caps.registers.guest_visible and not caps.memory_read.guest_visible
        assert driver.cpus() == [1, 2]
        assert driver.read_physical(0x100008, 8) == (0x100000).to_bytes(8, "little")
        # Scans read only what holds data: every non-zero page, in RAM, and not the zero runs.
        scan = driver.physical_ranges()
        ram_ranges = driver.image.ranges()
        assert ram_ranges == [(0, 0xA0000), (0xC0000, 4 * MiB)]
        for pa in range(0, len(ram), 4096):
            if any(ram[pa : pa + 4096]) and not 0xA0000 <= pa < 0xC0000:
                assert any(a <= pa < b for a, b in scan), hex(pa)
        assert all(any(c <= a and b <= d for c, d in ram_ranges) for a, b in scan)
        assert sum(b - a for a, b in scan) < 2 * MiB
        assert driver.read_registers(1)["rip"] == kernel_cpu(0).rip
        with pytest.raises(DriverError, match="no vCPU 3"):
            driver.read_registers(3)
        assert not caps.run_control and not caps.register_write
        assert driver.stop_fileno() is None  # nothing to watch: it never runs
        refusals = [
            lambda: driver.write_physical(0, b"x"),
            lambda: driver.write_register(1, 0, bytes(8)),
            lambda: driver.insert_breakpoint(BreakpointType.SOFTWARE, KERNEL_VA, 1),
            lambda: driver.remove_breakpoint(BreakpointType.SOFTWARE, KERNEL_VA, 1),
            lambda: driver.resume({1: "c"}),
            lambda: driver.resume({1: "s"}),
            driver.poll_stop,
            driver.interrupt,
            lambda: driver.wait_stop(1.0),
        ]
        for call in refusals:
            with pytest.raises(Unsupported, match="the libvmi-file driver (cannot|has no)"):
                call()
        driver.kill()  # nothing to power off: the session just ends
        assert driver.read_physical(0, 16) == bytes(ram[:16])  # nothing was written
        info = dict(driver.describe())
        assert "libvmi File driver" in info["driver"]
        assert "QEMU ELF dump, 2 vCPU(s)" in info["image"]
        assert "vmi_read_pa" in info["guest RAM"]
        assert "xmm0-xmm15" in info["not saved (GDB shows <unavailable>)"]
    finally:
        driver.close()


# -- raw images ------------------------------------------------------------------------------


def raw_image(tmp_path: Path) -> Path:
    path = tmp_path / "guest.raw"
    path.write_bytes(guest_ram())
    return path


def test_raw_image_with_registers_file(tmp_path) -> None:
    raw = raw_image(tmp_path)
    live = [
        RegisterFile.from_values(
            {"rip": KERNEL_VA, "cr0": 0x80050033, "cr3": PML4, "cr4": 0x6B0, "efer": 0xD01}
        ),
        RegisterFile.from_values({"rip": KERNEL_VA + 4, "cr3": PML4, "efer": 0x501}),
    ]
    regs = tmp_path / "regs.json"
    write_registers_file(regs, live, ram=[(0, 4 * MiB)])
    assert regs.stat().st_mode & 0o777 == 0o600
    with open_image(raw, registers=regs) as image:
        assert image.kind == "raw physical image"
        assert image.cpus() == [1, 2]
        assert image.registers(1).to_g() == live[0].to_g()
        assert image.registers(2)["efer"] == 0x501
        assert image.read(KERNEL_PA, 16) == b"kernel text here"
        assert image.memory.translate(PML4, KERNEL_VA) == KERNEL_PA


def test_registers_file_by_hand(tmp_path) -> None:
    regs = tmp_path / "regs.json"
    regs.write_text(
        json.dumps(
            {"vcpus": [{"rip": "0xffffffff81000000", "rflags": 2, "cr0": "0x80000001",
                        "cr3": "0x1000", "cr4": "0x20", "kernel_gs_base": "0x10"}]}
        )
    )  # fmt: skip
    (vcpu,) = read_registers_file(regs).vcpus
    assert vcpu.registers["eflags"] == 2 and vcpu.registers["k_gs_base"] == 0x10
    assert vcpu.registers["efer"] == 0x500  # derived: paging with PAE
    assert "rax" in vcpu.absent and "rip" not in vcpu.absent


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not a JSON registers file"),
        ('{"vcpus": []}', '"vcpus" is empty'),
        ('{"cpus": [{}]}', 'no "vcpus" list'),
        ('{"vcpus": [{"rpc": 1}]}', "no register named 'rpc'"),
        ('{"vcpus": [{"rip": "fast"}]}', "'fast' is not a number"),
        ('{"vcpus": [{"eflags": "0x100000000"}]}', "eflags is 32 bits wide"),
        ('{"vcpus": [{}], "ram": [[16, 8]]}', "ends before it starts"),
        ('{"format": "other/2", "vcpus": [{}]}', "format 'other/2'"),
    ],
)
def test_bad_registers_file(tmp_path, content: str, message: str) -> None:
    regs = tmp_path / "regs.json"
    regs.write_text(content)
    with pytest.raises(SetupError, match=message):
        read_registers_file(regs)


def test_raw_image_without_registers_uses_kernel_page_tables(tmp_path) -> None:
    raw = raw_image(tmp_path)
    seen = []

    def locate(read_phys, ranges):
        seen.append(ranges)
        assert read_phys(KERNEL_PA, 6) == b"kernel"
        return PML4, False

    with open_image(raw, locate_kernel=locate) as image:
        assert seen == [[(0, 4 * MiB)]]
        (vcpu,) = image.vcpus
        regs = vcpu.registers
        assert regs["cr3"] == PML4 and regs["efer"] == 0x500 and regs["cr0"] & (1 << 31)
        assert "rip" in vcpu.absent
        t = translate(image.read, regs["cr3"], KERNEL_VA, PagingMode.LONG4)
        assert isinstance(t, Translation) and t.pa == KERNEL_PA
        assert any("kernel's page tables" in d for _, d in image.describe())


def test_raw_image_without_registers_or_kernel(tmp_path) -> None:
    raw = raw_image(tmp_path)

    def locate(read_phys, ranges):
        raise LookupError("no VMCOREINFO note in guest RAM")

    with pytest.raises(
        SetupError, match=r"no VMCOREINFO note in guest RAM\): give them with --regs"
    ):
        open_image(raw, locate_kernel=locate)
    with pytest.raises(SetupError, match="has no registers: give them with --regs FILE"):
        open_image(raw)


def test_elf_dump_without_control_registers_gets_kernel_page_tables(tmp_path) -> None:
    ram = guest_ram()
    path = write_core(tmp_path / "d.elf", [(0, bytes(ram))], [kernel_cpu(0)], qemu_notes=False)
    with open_image(path, locate_kernel=lambda read_phys, ranges: (PML4, False)) as image:
        regs = image.registers(1)
        assert regs["rip"] == kernel_cpu(0).rip  # from NT_PRSTATUS
        assert regs["cr3"] == PML4  # from the kernel


# -- bad input -------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    with pytest.raises(SetupError, match=r"cannot open .*nothing.elf: No such file or directory"):
        open_image(tmp_path / "nothing.elf")


def test_directory(tmp_path) -> None:
    with pytest.raises(SetupError, match="is not a regular file"):
        open_image(tmp_path)


def test_empty_file(tmp_path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DumpFormatError, match="is empty"):
        open_image(tmp_path / "empty")


def test_unreadable_file(tmp_path, monkeypatch) -> None:
    path = raw_image(tmp_path)
    real_open = os.open

    def deny(p, *a, **k):
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(SetupError, match=r"cannot open .*guest.raw: Permission denied"):
        open_image(path, locate_kernel=lambda r, g: (PML4, False))


def test_text_file_is_not_a_dump(tmp_path) -> None:
    path = tmp_path / "README"
    path.write_text("not memory\n")
    with pytest.raises(DumpFormatError, match="not a memory dump: not an ELF core"):
        open_image(path)


def test_truncated_elf_dump(elf_dump) -> None:
    path, _ = elf_dump
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(DumpFormatError, match="is truncated"):
        open_image(path)


def test_registers_ram_past_end_of_image(tmp_path) -> None:
    raw = raw_image(tmp_path)
    regs = tmp_path / "regs.json"
    regs.write_text('{"vcpus": [{"cr3": 4096}], "ram": [[0, "0x800000"]]}')
    with pytest.raises(SetupError, match="past the end of"):
        open_image(raw, registers=regs)
