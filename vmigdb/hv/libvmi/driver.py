"""The driver for a saved guest (`vmigdb dump`): registers and memory, read-only, nothing runs.

Thin on purpose: `vmigdb.hv.libvmi.image` does the work. The capabilities say up front that there
is no run control and no write of any kind (`run_control=False`, `register_write=False`,
`memory_write=None`); the base class answers every such verb with `Unsupported`, and the session
refuses those packets before they get here.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.hv.base import Capabilities, Driver, DriverError, Mechanism
from vmigdb.hv.libvmi.image import DumpImage, KernelLocator, open_image

__all__ = ["DUMP_CAPABILITIES", "DumpDriver"]

_SAVED = "a saved copy: the guest is not running and cannot see it read"

DUMP_CAPABILITIES = Capabilities(
    registers=Mechanism(
        "dump-vcpu-state",
        "vCPU state saved in the dump (QEMU's notes, or a registers file)",
        False,
        why=_SAVED,
    ),
    memory_read=Mechanism(
        "libvmi-file",
        "libvmi's File driver (vmi_read_pa) on the saved RAM + vmigdb's page walk",
        False,
        why=_SAVED,
    ),
    memory_write=None,
    sw_breakpoint=None,
    hw_breakpoint=None,
    watchpoint=None,
    single_step=None,
    run_control=False,
    register_write=False,
)


class DumpDriver(Driver):
    """A `DumpImage` as a driver: `cpus`, `read_physical`, `physical_ranges`, `read_registers`.

    ``DumpDriver(DumpImage image)``, or `DumpDriver.open` with `open_image`'s arguments.
    """

    name = "libvmi-file"
    capabilities = DUMP_CAPABILITIES

    def __init__(self, image: DumpImage) -> None:
        self.image = image

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        registers: str | os.PathLike[str] | None = None,
        cache: Path | None = None,
        locate_kernel: KernelLocator | None = None,
    ) -> DumpDriver:
        """:raises SetupError: see `open_image`."""
        return cls(open_image(path, registers=registers, cache=cache, locate_kernel=locate_kernel))

    def cpus(self) -> list[int]:
        return self.image.cpus()

    def read_physical(self, pa: int, length: int) -> bytes:
        return self.image.read(pa, length)

    def physical_ranges(self) -> list[tuple[int, int]]:
        """RAM that holds data: the all-zero runs the raw copy keeps as holes are left out.

        Only scans use this (finding the kernel's VMCOREINFO), and zeros hold nothing to find;
        it saves reading gigabytes of an idle guest's free memory. Reads of the zero runs still
        work: `read_physical` checks against all of RAM (`DumpImage.ranges`).
        """
        return self.image.scan_ranges()

    def read_registers(self, cpu: int) -> RegisterFile:
        try:
            return self.image.registers(cpu)
        except KeyError:
            raise DriverError(f"no vCPU {cpu} in this dump") from None

    def absent_registers(self, cpu: int) -> frozenset[str]:
        """Registers the dump did not save for *cpu* (GDB shows them as <unavailable>)."""
        try:
            return frozenset(self.image.vcpu(cpu).absent)
        except KeyError:
            return frozenset()

    def close(self) -> None:
        self.image.close()

    def describe(self) -> list[tuple[str, str]]:
        return [("driver", "libvmi File driver (post-mortem, read-only)"), *self.image.describe()]
