"""A guest's saved memory and vCPUs, opened read-only: what `vmigdb dump --image FILE` serves.

Two kinds of file:
- a QEMU ELF dump (``dump-guest-memory``, ``monitor dump``): RAM from its PT_LOADs, flattened once
  into a raw image for libvmi (`vmigdb.hv.libvmi.flatten`), and every vCPU's registers from its
  notes (`vmigdb.hv.libvmi.cpustate`);
- a raw physical image (file offset = guest-physical address), with its registers from a
  registers file (`vmigdb.hv.libvmi.regsfile`) or, without one, the kernel's own page tables
  found in RAM, so that kernel virtual addresses still translate.

Physical memory is read by libvmi's File driver (`vmigdb.hv.libvmi.physmem`). This module does
not know Linux: the caller passes *locate_kernel* (``vmigdb.guest.linux.kernel.find_kernel``
wrapped, see `KernelLocator`), so drivers keep pointing down only.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vmigdb.arch.x86_64.paging import ReadPhys
from vmigdb.arch.x86_64.registers import REGISTER_INDEX, RegisterFile
from vmigdb.errors import SetupError
from vmigdb.hv.libvmi.cpustate import VcpuState, page_table_registers, vcpu_states
from vmigdb.hv.libvmi.elfcore import (
    ELF_MAGIC,
    DumpFormatError,
    ElfCore,
    identify,
    merge_ranges,
    read_elf_core,
)
from vmigdb.hv.libvmi.flatten import Flattened, flatten
from vmigdb.hv.libvmi.physmem import LibvmiMemory
from vmigdb.hv.libvmi.regsfile import RegistersFile, read_registers_file

__all__ = ["DumpImage", "KernelLocator", "open_image"]

log = logging.getLogger("vmigdb.hv.libvmi")

KernelLocator = Callable[[ReadPhys, list[tuple[int, int]]], tuple[int, bool]]
"""``(int kernel_cr3, bool la57) locate(ReadPhys read_phys, list ram_ranges)``: the physical
address of the kernel's own top-level page table, found in RAM. Raises any exception with a
one-line reason when there is no kernel. With guest.linux::

    def locate(read_phys, ranges):
        kernel = find_kernel(read_phys, ranges)
        return kernel.kernel_cr3, kernel.la57
"""

_PAGE = 4096
_CR4_LA57 = 1 << 12


class DumpImage:
    """Guest RAM and vCPU registers saved in a file. Open with `open_image`; `close` when done.

    :ivar path: The file the user named.
    :ivar kind: "QEMU ELF dump" or "raw physical image".
    :ivar memory: The libvmi reader of guest-physical RAM.
    :ivar vcpus: Each vCPU's state, vCPU 1 first.
    :ivar flattened: How the raw image was made (ELF dumps only).
    :ivar elf: The dump's headers and notes (ELF dumps only).
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        memory: LibvmiMemory,
        vcpus: list[VcpuState],
        *,
        flattened: Flattened | None = None,
        elf: ElfCore | None = None,
        opened_in: float = 0.0,
        written: float | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.memory = memory
        self.vcpus = vcpus
        self.flattened = flattened
        self.elf = elf
        self.opened_in = opened_in
        self.written = written  # the file's mtime: when the guest was saved
        self._by_number = {v.number: v for v in vcpus}

    def read(self, pa: int, length: int) -> bytes:
        """Guest-physical read through libvmi. :raises PhysicalMemoryError: outside RAM."""
        return self.memory.read(pa, length)

    def ranges(self) -> list[tuple[int, int]]:
        """Guest-physical RAM as ``(start, end)`` ranges, end exclusive."""
        return self.memory.ranges()

    def scan_ranges(self) -> list[tuple[int, int]]:
        """RAM that can hold anything but zeros (`LibvmiMemory.data_ranges`): what a scan reads."""
        return self.memory.data_ranges()

    def cpus(self) -> list[int]:
        """1-based vCPU numbers."""
        return [v.number for v in self.vcpus]

    def vcpu(self, cpu: int) -> VcpuState:
        """:raises KeyError: if there is no such vCPU."""
        return self._by_number[cpu]

    def registers(self, cpu: int) -> RegisterFile:
        """vCPU *cpu*'s registers as saved. :raises KeyError: if there is no such vCPU."""
        return self._by_number[cpu].registers

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) lines saying what this is and where each piece came from."""
        ram = self.ranges()
        total = sum(b - a for a, b in ram)
        when = ""
        if self.written is not None:
            when = f", written {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.written))}"
        lines = [("image", f"{self.path} ({self.kind}, {len(self.vcpus)} vCPU(s){when})")]
        where = f"libvmi File driver (vmi_read_pa) on {self.memory.path}"
        if self.flattened is not None:
            how = "reused" if self.flattened.reused else f"made in {self.flattened.seconds:.1f} s"
            where += f" (raw copy {how})"
        lines.append(("guest RAM", f"{total >> 20} MiB in {len(ram)} range(s), {where}"))
        sources = sorted({v.source for v in self.vcpus})
        lines.append(("registers", "; ".join(sources)))
        absent = sorted(set().union(*(v.absent for v in self.vcpus)), key=_register_order)
        if absent:
            lines.append(("not saved (GDB shows <unavailable>)", _summarise(absent)))
        if "rip" in absent:
            lines.append(("rip", "not saved: shown as 0 (GDB cannot do without a PC)"))
        for note in sorted(set().union(*(v.derived for v in self.vcpus))):
            lines.append(("derived", note))
        return lines

    def close(self) -> None:
        self.memory.close()

    def __enter__(self) -> DumpImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _register_order(name: str) -> int:
    return REGISTER_INDEX.get(name, 1 << 30)


def _summarise(names: list[str]) -> str:
    """``st0-st7, xmm0-xmm15`` rather than 24 names."""
    out: list[str] = []
    groups: dict[str, list[int]] = {}
    for name in names:
        stem = name.rstrip("0123456789")
        if stem in ("st", "xmm") and stem != name:
            groups.setdefault(stem, []).append(int(name[len(stem) :]))
            if len(groups[stem]) == 1:
                out.append(stem)
        else:
            out.append(name)
    return ", ".join(f"{n}{min(groups[n])}-{n}{max(groups[n])}" if n in groups else n for n in out)


def _open_file(path: Path) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError(f"cannot open {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SetupError(f"{path} is not a regular file: give a dump or a raw memory image")
    if st.st_size == 0:
        os.close(fd)
        raise DumpFormatError(f"{path} is empty")
    return fd, st


def _with_page_tables(v: VcpuState, cr3: int, la57: bool) -> VcpuState:
    """A vCPU whose dump had no control registers, given the kernel's page tables."""
    base = page_table_registers(cr3, la57).registers
    values = v.registers.values()
    for name in ("cr0", "cr3", "cr4", "efer"):
        values[name] = base[name]
    absent = tuple(n for n in v.absent if n not in ("cr0", "cr3", "cr4", "efer"))
    derived = (*v.derived, "cr0/cr3/cr4/efer: the kernel's page tables, found from VMCOREINFO")
    long_mode = v.registers.long_mode
    registers = RegisterFile(  # still not saved: GDB shows them unavailable
        RegisterFile.from_values(values, long_mode).data, long_mode, v.registers.unavailable
    )
    return replace(v, registers=registers, absent=absent, derived=derived)


def open_image(
    path: str | os.PathLike[str],
    *,
    registers: str | os.PathLike[str] | None = None,
    cache: Path | None = None,
    locate_kernel: KernelLocator | None = None,
) -> DumpImage:
    """Open a QEMU ELF dump or a raw physical image for reading.

    ``DumpImage open_image(path, *, registers=None, cache=None, locate_kernel=None)``

    :param registers: A registers file (`vmigdb.hv.libvmi.regsfile`); for an ELF dump it replaces
        the registers in its notes.
    :param cache: Where an ELF dump's raw copy goes (default: beside it, else the user's cache).
    :param locate_kernel: Finds the kernel's page tables when no vCPU has a CR3.
    :raises SetupError: (`DumpFormatError` for a bad file) with a one-line message saying what to
        do: a missing, unreadable, truncated or non-dump file, a bad registers file, or an image
        with no registers in which no kernel is found.
    """
    start = time.perf_counter()
    path = Path(path)
    regs_file: RegistersFile | None = read_registers_file(registers) if registers else None
    fd, st = _open_file(path)
    memory = None
    try:
        head = os.pread(fd, 64, 0)
        elf = flattened = None
        if head.startswith(ELF_MAGIC):
            elf = read_elf_core(fd, path)
            kind = "QEMU ELF dump" if any(n.name == "QEMU" for n in elf.notes) else "ELF core dump"
            vcpus: list[VcpuState] = []
            if regs_file is None:
                try:
                    vcpus = vcpu_states(elf.notes, elf.machine)
                except ValueError as e:
                    log.warning("%s: %s", path, e)
            ranges = elf.ram_ranges()
            flattened = flatten(elf, fd, cache)
            raw_path = flattened.path
        else:
            what = identify(head)
            if what:
                raise DumpFormatError(
                    f"{path} is {what}: vmigdb reads ELF dumps (dump-guest-memory without "
                    "format) and raw physical images"
                )
            if st.st_size % _PAGE:
                raise DumpFormatError(
                    f"{path} is not a memory dump: not an ELF core, and its size ({st.st_size} "
                    "bytes) is not a whole number of pages, as a raw physical image's is"
                )
            kind = "raw physical image"
            ranges = (
                merge_ranges(regs_file.ram) if regs_file and regs_file.ram else [(0, st.st_size)]
            )
            if ranges[-1][1] > st.st_size:
                raise SetupError(
                    f"{regs_file.path if regs_file else path}: RAM up to {ranges[-1][1]:#x} is past "
                    f"the end of {path} ({st.st_size} bytes)"
                )
            raw_path = path
            vcpus = []
        if regs_file is not None:
            vcpus = list(regs_file.vcpus)
        memory = LibvmiMemory(raw_path, ranges)

        if not any(v.has_page_tables for v in vcpus):
            cr3, la57 = _locate(path, memory, locate_kernel, bool(vcpus))
            vcpus = [_with_page_tables(v, cr3, la57) for v in vcpus] or [
                page_table_registers(cr3, la57)
            ]
        first = vcpus[0].registers
        if first["efer"] & (1 << 10) and not first["cr4"] & _CR4_LA57:
            memory.set_kernel_page_tables(first["cr3"])
    except BaseException:
        if memory is not None:
            memory.close()
        os.close(fd)
        raise
    os.close(fd)  # libvmi holds the raw image open; the ELF itself is no longer needed
    seconds = time.perf_counter() - start
    image = DumpImage(
        path, kind, memory, vcpus, flattened=flattened, elf=elf, opened_in=seconds,
        written=st.st_mtime,
    )  # fmt: skip
    log.info("opened %s: %s, %d vCPU(s), in %.2f s", path, kind, len(vcpus), seconds)
    return image


def _locate(
    path: Path, memory: LibvmiMemory, locate: KernelLocator | None, have_vcpus: bool
) -> tuple[int, bool]:
    what = "no control registers" if have_vcpus else "no registers"
    fix = "give them with --regs FILE"
    if locate is None:
        raise SetupError(f"{path} has {what}: {fix}")
    try:
        return locate(memory.read, memory.data_ranges())
    except Exception as e:  # noqa: BLE001 - any reason the locator gives is the user's answer
        raise SetupError(
            f"{path} has {what} and no Linux kernel was found in it ({e}): {fix}"
        ) from None
