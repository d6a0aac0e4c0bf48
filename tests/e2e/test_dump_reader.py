"""A real QEMU 7.2 dump read back through libvmi: the same registers QEMU's gdbstub shows for each
vCPU, the same bytes as guest RAM, the same kernel found, the same translations.

The demo guest (2 vCPUs, 512 MiB) boots under vmigdb's QEMU launcher, is stopped through the
gdbstub, and QEMU writes ``dump-guest-memory`` (ELF, no paging) over QMP while it stays stopped.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from vmigdb.arch.x86_64.paging import Translation, Translator, paging_mode
from vmigdb.guest.linux.kernel import find_kernel
from vmigdb.hv.libvmi import DumpDriver, open_image
from vmigdb.hv.libvmi.regsfile import write_registers_file
from vmigdb.hv.qemu.dump import DumpRefused, dump_guest_memory
from vmigdb.hv.qemu.launch import QemuMachine, launch_qemu
from vmigdb.hv.qemu.process import QemuConfig

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 120.0
CHUNK = 8 << 20


class Saved:
    """What the live guest showed at the stop, and the dump QEMU wrote of it."""

    def __init__(self, machine: QemuMachine, dump: Path, dump_seconds: float) -> None:
        driver = machine.driver
        self.cpus = driver.cpus()
        self.registers = {cpu: driver.read_registers(cpu) for cpu in self.cpus}
        self.memory = machine.process.memory
        self.dump = dump
        self.dump_seconds = dump_seconds


async def _boot_and_dump(tmp: Path, guest_image) -> tuple[QemuMachine, Path, float]:
    console = tmp / "console.log"
    config = QemuConfig(
        kernel=guest_image.kernel, initrd=guest_image.initrd, smp=2, memory_mib=512, serial=console
    )
    machine = await launch_qemu(config)
    try:
        machine.driver.resume({cpu: "c" for cpu in machine.driver.cpus()})
        deadline = time.monotonic() + BOOT_TIMEOUT
        while b"vmigdb-guest: ready" not in (console.read_bytes() if console.exists() else b""):
            if time.monotonic() > deadline:
                raise AssertionError("the demo guest did not boot")
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # let it settle into its idle loop
        dump = tmp / "guest.elf"
        with pytest.raises(DumpRefused, match="the guest is running: stop it first"):
            await dump_guest_memory(machine.qmp, dump)
        assert not dump.exists()
        machine.driver.interrupt()
        machine.driver.wait_stop(10.0)
        before = await machine.qmp.status()
        written = await dump_guest_memory(machine.qmp, dump)
        assert written.size == dump.stat().st_size > 512 << 20
        assert await machine.qmp.status() == before  # still stopped, as the gdbstub left it
        with pytest.raises(DumpRefused, match="File exists"):
            await dump_guest_memory(machine.qmp, dump)  # never over an existing file
        assert dump.stat().st_size == written.size
        return machine, dump, written.seconds
    except BaseException:
        await machine.shutdown()
        raise


@pytest.fixture(scope="module")
def saved(tmp_path_factory, guest_image):
    tmp = tmp_path_factory.mktemp("dump")
    loop = asyncio.new_event_loop()
    machine, dump, seconds = loop.run_until_complete(_boot_and_dump(tmp, guest_image))
    try:
        yield Saved(machine, dump, seconds)
    finally:
        loop.run_until_complete(machine.shutdown())
        loop.close()


@pytest.fixture(scope="module")
def driver(saved):
    d = DumpDriver.open(saved.dump)
    yield d
    d.close()


def test_dump_is_private_and_timed(saved) -> None:
    assert os.stat(saved.dump).st_mode & 0o777 == 0o600
    print(f"dump-guest-memory of 512 MiB: {saved.dump_seconds:.2f} s")


def test_registers_match_qemus_gdbstub(saved, driver) -> None:
    assert driver.cpus() == saved.cpus == [1, 2]
    for cpu in saved.cpus:
        live = saved.registers[cpu].values()
        state = driver.image.vcpu(cpu)
        dumped = state.registers.values()
        for name, value in dumped.items():
            if name in state.absent:
                continue
            if name == "efer":  # derived: LME and LMA only
                assert value == live["efer"] & 0x500, (cpu, name)
                continue
            assert value == live[name], (cpu, name, hex(value), hex(live[name]))
        assert state.registers.long_mode == saved.registers[cpu].long_mode


def test_memory_matches_guest_ram(saved, driver) -> None:
    for start, end in saved.memory.ranges():
        if start == 0:  # below 1 MiB QEMU dumps what the guest sees (ROM shadows, no VGA hole)
            start = 1 << 20
            assert driver.read_physical(0, 0xA0000) == saved.memory.read(0, 0xA0000)
        for pa in range(start, end, CHUNK):
            n = min(CHUNK, end - pa)
            assert driver.read_physical(pa, n) == saved.memory.read(pa, n), hex(pa)


def test_same_kernel_and_translations(saved, driver) -> None:
    live = find_kernel(saved.memory.read, saved.memory.ranges())
    dumped = find_kernel(driver.read_physical, driver.physical_ranges())
    assert (dumped.release, dumped.kernel_cr3, dumped.kaslr_offset) == (
        live.release,
        live.kernel_cr3,
        live.kaslr_offset,
    )
    walker = Translator(driver.read_physical)
    for cpu in saved.cpus:
        regs = driver.read_registers(cpu)
        mode = paging_mode(regs["cr0"], regs["cr4"], regs["efer"])
        t = walker.translate(regs["cr3"], regs["rip"], mode)
        assert isinstance(t, Translation)
        assert driver.image.memory.translate(regs["cr3"], regs["rip"]) == t.pa  # libvmi agrees
        assert driver.read_physical(t.pa, 16) == saved.memory.read(t.pa, 16)


def _locate(read_phys, ranges):
    kernel = find_kernel(read_phys, ranges)
    return kernel.kernel_cr3, kernel.la57


def test_raw_image_with_and_without_registers(saved, tmp_path) -> None:
    """The same guest as a raw physical image: with a registers file written from the live
    registers, and with none (the kernel's page tables found in RAM)."""
    ((start, end),) = saved.memory.ranges()  # 512 MiB: all below the PCI hole
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        for pa in range(start, end, CHUNK):
            f.write(saved.memory.read(pa, min(CHUNK, end - pa)))
    regs = tmp_path / "regs.json"
    write_registers_file(regs, [saved.registers[cpu] for cpu in saved.cpus])
    live = find_kernel(saved.memory.read, saved.memory.ranges())
    stext = live.symbol("_stext")
    assert stext is not None
    with open_image(raw, registers=regs) as image:
        assert image.cpus() == saved.cpus
        for cpu in saved.cpus:
            assert image.registers(cpu).to_g() == saved.registers[cpu].to_g()
        assert image.memory.translate(live.kernel_cr3, stext) == live.kernel_image_pa(stext)

    with open_image(raw, locate_kernel=_locate) as image:
        (vcpu,) = image.vcpus
        regs_ = vcpu.registers
        assert regs_["cr3"] == live.kernel_cr3
        mode = paging_mode(regs_["cr0"], regs_["cr4"], regs_["efer"])
        t = Translator(image.read).translate(regs_["cr3"], stext, mode)
        assert isinstance(t, Translation) and t.pa == live.kernel_image_pa(stext)
        assert image.read(t.pa, 64) == saved.memory.read(t.pa, 64)
