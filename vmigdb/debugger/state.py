"""The stopped machine as GDB addresses it: vCPU registers and guest memory.

Registers are read once per vCPU per stop and cached; virtual addresses are translated with vmigdb's
own page walk over guest-physical memory (through the scoped process's page tables when a process
is in scope), translations cached. `forget` drops both when the guest runs. This object is the only
owner of those caches and of the address mode (`physical_addresses`).

What GDB sees of a vCPU's registers may be a `RegisterView` for the stop (a system call's caller,
at its entry), and ``orig_rax`` (GDB's Linux register) is a value of the stop, not of the vCPU:
the ``gdb_*`` methods serve GDB from those; `registers` is always the vCPU's own state, which run
control decides with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from vmigdb.arch.x86_64.paging import (
    Fault,
    PagingMode,
    PhysicalMemoryError,
    Translation,
    Translator,
    paging_mode,
    translate_range,
)
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.arch.x86_64.validate import check_register_write
from vmigdb.debugger.model import MemoryFault, RegisterView, RegisterWriteRefused
from vmigdb.debugger.policy import StealthPolicy
from vmigdb.debugger.scope import ScopeWatch
from vmigdb.hv.base import Driver, Unsupported

PAGE = 0x1000


class MachineState:
    def __init__(
        self,
        driver: Driver,
        policy: StealthPolicy,
        scope: ScopeWatch,
        unmapped: Callable[[int, int, int], bytes] = lambda pid, address, size: b"",
    ) -> None:
        self._driver = driver
        # (pid, address, size) -> what the scoped process's OS has for memory its page tables do
        # not map yet (a mapped file's page in the page cache)
        self._unmapped = unmapped
        self._policy = policy
        self._scope = scope
        self._cpus = driver.cpus()
        self._regs: dict[int, RegisterFile] = {}
        self._views: dict[int, RegisterView] = {}  # what GDB sees instead, at this stop
        self._orig_rax: dict[int, int] = {}  # GDB's orig_rax at this stop (default -1)
        self.translator = Translator(driver.read_physical)
        self.physical_addresses = False  # `monitor phys on`: GDB's addresses are guest-physical

    def cpus(self) -> list[int]:
        return list(self._cpus)

    def forget(self) -> None:
        """The guest runs (or ran): cached registers and translations are stale."""
        self._regs.clear()
        self._views.clear()
        self._orig_rax.clear()
        self.translator.flush()

    # -- what GDB sees --------------------------------------------------------------------------

    def set_view(self, cpu: int, view: RegisterView) -> None:
        """Until the guest runs, GDB sees `view` for `cpu`."""
        self._views[cpu] = view
        self._orig_rax[cpu] = view.orig_rax

    def set_orig_rax(self, cpu: int, value: int) -> None:
        self._orig_rax[cpu] = value

    def gdb_registers(self, cpu: int) -> RegisterFile:
        view = self._views.get(cpu)
        return view.registers if view is not None else self.registers(cpu)

    def orig_rax(self, cpu: int) -> int:
        """GDB's ``orig_rax``: the system call's number at a system-call stop, else -1."""
        return self._orig_rax.get(cpu, -1)

    def write_gdb_registers(self, cpu: int, values: dict[int, bytes]) -> None:
        """Write registers as GDB sees them: through the view when there is one (into the
        kernel's saved copy of the caller's registers), else to the vCPU.

        :raises RegisterWriteRefused, Unsupported: as `write_registers`
        """
        view = self._views.get(cpu)
        if view is None:
            self.write_registers(cpu, values)
            return
        for regnum, value in values.items():
            if regnum in view.fixed:
                raise RegisterWriteRefused(f"refused: {view.fixed[regnum]}")
            reason = check_register_write(regnum, value, view.registers)
            if reason is not None:
                raise RegisterWriteRefused(f"refused: {reason}")
        saved = {r: v for r, v in values.items() if r in view.slots}
        live = {r: v for r, v in values.items() if r not in view.slots}
        if live:
            self.write_registers(cpu, live)
        registers = view.registers
        for regnum, value in saved.items():
            self.write_kernel(cpu, view.slots[regnum], value.ljust(8, b"\0"))
        for regnum, value in values.items():
            registers = registers.with_value(regnum, value)
        self._views[cpu] = RegisterView(
            registers, view.orig_rax, view.slots, view.fixed, view.orig_rax_slot
        )

    def write_orig_rax(self, cpu: int, value: int) -> None:
        """GDB writes orig_rax (its Linux ABI writes -1 with every PC change): into the kernel's
        saved copy at a system call's entry, else it is only the stop's value."""
        view = self._views.get(cpu)
        if view is not None and view.orig_rax_slot is not None:
            self.write_kernel(
                cpu, view.orig_rax_slot, (value & (1 << 64) - 1).to_bytes(8, "little")
            )
        self._orig_rax[cpu] = value

    def write_kernel(self, cpu: int, address: int, data: bytes) -> None:
        """Write kernel memory (mapped in every address space) through the vCPU's page tables.

        :raises Unsupported: if the driver cannot write; :raises MemoryFault: if unmapped
        """
        mechanism = self._driver.capabilities.memory_write
        if mechanism is None:
            raise Unsupported(f"the {self._driver.name} driver cannot write guest memory")
        self._policy.record("memory write", mechanism)
        regs = self.registers(cpu)
        mode = paging_mode(regs["cr0"], regs["cr4"], regs["efer"])
        done = 0
        while done < len(data):
            va = address + done
            chunk = min(len(data) - done, PAGE - (va & (PAGE - 1)))
            where = self.translator.translate(regs["cr3"], va, mode)
            if isinstance(where, Fault):
                raise MemoryFault(va, where.reason)
            self._driver.write_physical(where.pa, data[done : done + chunk])
            done += chunk

    # -- registers --------------------------------------------------------------------------------

    def registers(self, cpu: int) -> RegisterFile:
        regs = self._regs.get(cpu)
        if regs is None:
            regs = self._regs[cpu] = self._driver.read_registers(cpu)
            self._policy.record("registers", self._driver.capabilities.registers)
        return regs

    def write_registers(self, cpu: int, values: dict[int, bytes]) -> None:
        """Write registers; all are checked first, so a refusal writes none of them.

        :raises Unsupported: if the driver cannot write registers (a dump).
        :raises RegisterWriteRefused: if a value is one no vCPU could hold.
        """
        if not self._driver.capabilities.register_write:
            raise Unsupported(f"the {self._driver.name} driver cannot write registers")
        current = self.registers(cpu)
        for regnum, value in values.items():
            reason = check_register_write(regnum, value, current)
            if reason is not None:
                raise RegisterWriteRefused(f"refused: {reason}")
        for regnum, value in values.items():
            self._driver.write_register(cpu, regnum, value)
            self._regs.pop(cpu, None)
        self.translator.flush()  # cr3/cr4/efer may have changed

    def cached_registers(self, cpu: int) -> RegisterFile | None:
        """The registers this stop has already read for `cpu`, without a hypervisor round trip."""
        return self._regs.get(cpu)

    # -- memory -----------------------------------------------------------------------------------

    def space(self, cpu: int) -> tuple[int, PagingMode]:
        """The page tables GDB's addresses go through: the scoped process's, else the vCPU's."""
        regs = self.registers(cpu)
        cr3 = self._scope.cr3
        return regs["cr3"] if cr3 is None else cr3, paging_mode(
            regs["cr0"], regs["cr4"], regs["efer"]
        )

    def translate(self, cpu: int, addr: int) -> Translation | Fault:
        cr3, mode = self.space(cpu)
        return self.translator.translate(cr3, addr, mode)

    def read_memory(self, cpu: int, addr: int, length: int) -> bytes:
        """Read up to `length` bytes; stops at the first unreadable byte (GDB's `m` semantics)."""
        self._policy.record("memory read", self._driver.capabilities.memory_read)
        if self.physical_addresses:
            data = self._read_physical_partial(addr, length)
        else:
            cr3, mode = self.space(cpu)
            data = self.translator.read_virtual(cr3, addr, length, mode)
            scope = self._scope.current
            if len(data) < length and scope is not None:
                data += self._unmapped(scope.pid, addr + len(data), length - len(data))
        if length and not data:
            raise MemoryFault(addr, "not mapped" if not self.physical_addresses else "not RAM")
        return data

    def _read_physical_partial(self, pa: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            chunk = min(length - len(out), PAGE - ((pa + len(out)) & (PAGE - 1)))
            try:
                out += self._driver.read_physical(pa + len(out), chunk)
            except PhysicalMemoryError:
                break
        return bytes(out)

    def dump_memory(self, cpu: int, addr: int, length: int, out: BinaryIO) -> int:
        """Write [addr, addr+length) to `out`, unmapped bytes as zeros; returns how many were unmapped.

        Virtual (or physical with `phys on`) chunks are translated once per contiguous run and
        copied straight from guest RAM: no packet, no hex.
        """
        self._policy.record("memory read", self._driver.capabilities.memory_read)
        if self.physical_addresses:
            chunks = [(addr, addr, length)]
        else:
            cr3, mode = self.space(cpu)
            chunks = translate_range(self._driver.read_physical, cr3, addr, length, mode)
        unmapped = 0
        for _va, pa, size in chunks:
            if pa is not None:
                done = 0
                while done < size:
                    step = min(size - done, 1 << 24)
                    try:
                        out.write(self._driver.read_physical(pa + done, step))
                    except PhysicalMemoryError:
                        data = self._read_physical_partial(pa + done, step)
                        out.write(data + bytes(step - len(data)))
                        unmapped += step - len(data)
                    done += step
            else:
                out.write(bytes(size))
                unmapped += size
        return unmapped

    def write_memory(self, cpu: int, addr: int, data: bytes) -> None:
        """Write through the hypervisor, page by page; all or nothing per page.

        :raises Unsupported: if the driver cannot write guest memory (a dump).
        """
        mechanism = self._driver.capabilities.memory_write
        if mechanism is None:
            raise Unsupported(f"the {self._driver.name} driver cannot write guest memory")
        self._policy.record("memory write", mechanism)
        done = 0
        while done < len(data):
            va = addr + done
            chunk = min(len(data) - done, PAGE - (va & (PAGE - 1)))
            if self.physical_addresses:
                pa = va
            else:
                where = self.translate(cpu, va)
                if isinstance(where, Fault):
                    raise MemoryFault(va, where.reason)
                pa = where.pa
            self._driver.write_physical(pa, data[done : done + chunk])
            done += chunk
        self.translator.flush()  # the write may have been to a page table
