"""A driver with no run control and no writes: an in-memory "dump" of the fake machine.

It overrides only what `Driver` requires (vCPUs, physical reads, registers, close) and declares
nothing else, the way a memory-dump driver will: proof that such a driver is first-class.
"""

from __future__ import annotations

from tests.unit.fakes import RAM_SIZE, default_registers, initial_ram, qemu_g
from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.hv.base import Capabilities, Driver, Mechanism

DUMP_CAPABILITIES = Capabilities(
    registers=Mechanism("dump-notes", "registers saved in the dump", False, why="a file"),
    memory_read=Mechanism("dump-ram", "guest RAM saved in the dump", False, why="a file"),
    memory_write=None,
    sw_breakpoint=None,
    hw_breakpoint=None,
    watchpoint=None,
    single_step=None,
    run_control=False,
    register_write=False,
)


class DumpDriver(Driver):
    name = "dump"
    capabilities = DUMP_CAPABILITIES

    def __init__(self, ncpus: int = 2, ram_size: int = RAM_SIZE) -> None:
        self.ram = bytes(initial_ram(ram_size))
        self.regs = {
            cpu: RegisterFile.from_qemu_g(qemu_g(default_registers(cpu)))
            for cpu in range(1, ncpus + 1)
        }
        self.reads = 0
        self.closed = False

    def cpus(self) -> list[int]:
        return sorted(self.regs)

    def read_physical(self, pa: int, length: int) -> bytes:
        self.reads += 1
        if pa < 0 or length < 0 or pa + length > len(self.ram):
            raise PhysicalMemoryError(f"{pa:#x}+{length:#x} is outside the dump")
        return self.ram[pa : pa + length]

    def read_registers(self, cpu: int) -> RegisterFile:
        return self.regs[cpu]

    def close(self) -> None:
        self.closed = True
