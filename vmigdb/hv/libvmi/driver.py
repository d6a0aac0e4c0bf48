"""The driver for a saved guest (`vmigdb dump`): registers and memory, read-only, nothing runs.

Thin on purpose: `vmigdb.hv.libvmi.image` does the work. Everything that would run, stop or
change the guest is refused with `DriverError`, and the capabilities say so up front.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.hv.base import (
    BreakpointType,
    Capabilities,
    Driver,
    DriverError,
    DriverStop,
    Mechanism,
)
from vmigdb.hv.libvmi.image import DumpImage, KernelLocator, open_image

__all__ = ["DUMP_CAPABILITIES", "DumpDriver"]

DUMP_CAPABILITIES = Capabilities(
    registers=Mechanism(
        "dump-vcpu-state",
        "vCPU state saved in the dump (QEMU's notes, or a registers file)",
        False,
        why="a saved copy: the guest is not running and cannot see it read",
    ),
    memory_read=Mechanism(
        "libvmi-file",
        "libvmi's File driver (vmi_read_pa) on the saved RAM + vmigdb's page walk",
        False,
        why="a saved copy: the guest is not running and cannot see it read",
    ),
    memory_write=None,
    sw_breakpoint=None,
    hw_breakpoint=None,
    watchpoint=None,
    single_step=None,
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

    def _refuse(self, what: str) -> DriverError:
        return DriverError(f"{what}: this is a saved guest (a dump), read-only; nothing runs")

    def write_physical(self, pa: int, data: bytes) -> None:
        raise self._refuse("cannot write memory")

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        raise self._refuse("cannot write registers")

    def insert_breakpoint(
        self, type: BreakpointType, addr: int, length: int, mechanism: str | None = None
    ) -> None:
        raise self._refuse("no breakpoints or watchpoints")

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> None:
        raise self._refuse("no breakpoints or watchpoints")

    def resume(self, actions: dict[int, str]) -> None:
        raise self._refuse("cannot continue or step")

    def stop_fileno(self) -> int:
        raise self._refuse("never runs")

    def poll_stop(self) -> DriverStop | None:
        raise self._refuse("never runs")

    def interrupt(self) -> None:
        raise self._refuse("never runs")

    def wait_stop(self, timeout: float) -> DriverStop:
        raise self._refuse("never runs")

    def kill(self) -> None:
        raise self._refuse("cannot kill")

    def close(self) -> None:
        self.image.close()

    def describe(self) -> list[tuple[str, str]]:
        return [("driver", "libvmi File driver (post-mortem, read-only)"), *self.image.describe()]
