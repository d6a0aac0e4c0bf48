"""A fake hypervisor driver: an in-memory x86-64 machine for debugger and session tests.

`FakeDriver` holds N vCPUs (QEMU-layout register payloads turned into `RegisterFile`s), a bytearray
of guest-physical RAM with a real 4-level page table in it, and a script of stops. It records every
call the debugger makes, so tests can count hypervisor round trips, and it checks the arguments
against the `Driver` contract: a call the contract does not allow (a negative address, an unknown
vCPU, removing a breakpoint that was never inserted...) is appended to `violations` and refused.

Memory layout (guest-physical):
    0x1000  PML4            0x2000  PDPT (for the top 2 GiB)
    0x3000  PD              0x4000  PT
    0x5000  PDPT, 0x6000 PD, 0x7000 PT for the lower half
    KERNEL_PA .. +4 pages   data behind KERNEL_VA (4K pages; the 4th is read-only and NX)
    USER_PA                 data behind USER_VA (one 4K user page)
    HUGE_PA .. +2 MiB       data behind HUGE_VA (one 2M page)

Virtual layout (cr3 = PML4_PA, long mode):
    KERNEL_VA + 0x0000 .. 0x3fff   -> KERNEL_PA (4 contiguous 4K pages)
    UNMAPPED_VA = KERNEL_VA + 0x4000   not present
    OUTSIDE_RAM_VA = KERNEL_VA + 0x5000 -> a physical page beyond RAM
    HUGE_VA .. +2 MiB              -> HUGE_PA (one 2M page; RAM must be >= 4 MiB)
    USER_VA .. +0xfff              -> USER_PA (lower half, user)
"""

from __future__ import annotations

import functools
import os
from collections import deque

from vmigdb.arch.x86_64.paging import PagingMode, PhysicalMemoryError, Translation, translate
from vmigdb.arch.x86_64.registers import (
    QEMU_REGISTERS,
    REGISTER_INDEX,
    REGISTERS,
    RegisterFile,
)
from vmigdb.hv.base import BreakpointType, Driver, DriverError, DriverStop
from vmigdb.hv.qemu.driver import kvm_capabilities, tcg_capabilities

PAGE = 0x1000
RAM_SIZE = 16 << 20

PML4_PA = 0x1000
PDPT_PA = 0x2000
PD_PA = 0x3000
PT_PA = 0x4000
LOW_PDPT_PA = 0x5000
LOW_PD_PA = 0x6000
LOW_PT_PA = 0x7000

KERNEL_VA = 0xFFFF_FFFF_8100_0000
KERNEL_PA = 0x10_0000
KERNEL_PAGES = 4
UNMAPPED_VA = KERNEL_VA + KERNEL_PAGES * PAGE
OUTSIDE_RAM_VA = UNMAPPED_VA + PAGE
OUTSIDE_RAM_PA = 0x7FFF_0000
HUGE_VA = 0xFFFF_FFFF_8120_0000
HUGE_PA = 0x20_0000
HUGE_SIZE = 0x20_0000
USER_VA = 0x40_0000
USER_PA = 0x10_8000

_P, _RW, _US, _PS, _NX = 1, 2, 4, 0x80, 1 << 63

CR0 = 0x8005_0033  # PG | WP | NE | ET | MP | PE
CR4 = 0x0000_06B0  # OSXMMEXCPT | OSFXSR | PGE | PAE | PSE
EFER = 0x0000_0D01  # NXE | LMA | LME | SCE

HW_SLOTS = 4  # debug registers under KVM

_U64 = (1 << 64) - 1
_SIZES = {r.name: r.bitsize // 8 for r in REGISTERS}


def ram_pattern(pa: int) -> int:
    """The byte a fresh FakeDriver holds at guest-physical `pa` (outside the page tables)."""
    return (pa * 7 + 3) & 0xFF


def default_registers(cpu: int) -> dict[str, int]:
    """Distinctive register values for vCPU `cpu` (1-based), in 64-bit kernel mode."""
    values = {name: 0 for name, _ in QEMU_REGISTERS}
    for i, reg in enumerate(REGISTERS[:16]):  # rax .. r15
        values[reg.name] = 0x0101_0101_0000_0000 * (i + 1) + cpu
    values.update(
        rip=KERNEL_VA + 0x100 * cpu,
        rsp=HUGE_VA + 0x1000 * cpu,
        rbp=HUGE_VA + 0x1000 * cpu + 0x80,
        eflags=0x246,
        cs=0x10,
        ss=0x18,
        ds=0x18,
        es=0x18,
        fs=0,
        gs=0,
        fs_base=0x7F00_0000_0000 + cpu,
        gs_base=0xFFFF_8880_0000_0000 + cpu * 0x10_0000,
        k_gs_base=0x7F11_0000_0000 + cpu,
        cr0=CR0,
        cr2=0xDEAD_0000 + cpu,
        cr3=PML4_PA,
        cr4=CR4,
        cr8=0,
        efer=EFER,
        fctrl=0x37F,
        mxcsr=0x1F80,
    )
    for i in range(8):
        values[f"st{i}"] = (0x3FFF << 64) | (0x8000_0000_0000_0000 + i)  # 1.0-ish, 80-bit
    for i in range(16):
        values[f"xmm{i}"] = int.from_bytes(bytes((i * 16 + j) & 0xFF for j in range(16)), "little")
    return values


def qemu_g(values: dict[str, int]) -> bytes:
    """QEMU 7.2's 608-byte long-mode `g` payload for register values given by name."""
    out = bytearray()
    for name, size in QEMU_REGISTERS:
        out += (values.get(name, 0) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    return bytes(out)


@functools.lru_cache(maxsize=64)
def _default_payload(cpu: int) -> bytes:
    return qemu_g(default_registers(cpu))


@functools.lru_cache(maxsize=4)
def initial_ram(size: int) -> bytes:
    """A fresh machine's RAM: the byte pattern, with the page tables of the module docstring."""
    if size % 256 or size < HUGE_PA + HUGE_SIZE:
        raise ValueError(f"RAM size {size:#x} must be a multiple of 256 and hold the 2M page")
    ram = bytearray(bytes(ram_pattern(i) for i in range(256))) * (size // 256)

    def entry(table: int, index: int, value: int) -> None:
        ram[table + index * 8 : table + index * 8 + 8] = value.to_bytes(8, "little")

    for table in (PML4_PA, PDPT_PA, PD_PA, PT_PA, LOW_PDPT_PA, LOW_PD_PA, LOW_PT_PA):
        ram[table : table + PAGE] = bytes(PAGE)
    va = KERNEL_VA
    entry(PML4_PA, (va >> 39) & 0x1FF, PDPT_PA | _P | _RW)
    entry(PDPT_PA, (va >> 30) & 0x1FF, PD_PA | _P | _RW)
    entry(PD_PA, (va >> 21) & 0x1FF, PT_PA | _P | _RW)
    for i in range(KERNEL_PAGES):
        flags = _P | _RW if i < KERNEL_PAGES - 1 else _P | _NX
        entry(PT_PA, ((va >> 12) & 0x1FF) + i, KERNEL_PA + i * PAGE | flags)
    entry(PT_PA, (OUTSIDE_RAM_VA >> 12) & 0x1FF, OUTSIDE_RAM_PA | _P | _RW)
    entry(PD_PA, (HUGE_VA >> 21) & 0x1FF, HUGE_PA | _P | _RW | _PS)
    user = _P | _RW | _US
    entry(PML4_PA, (USER_VA >> 39) & 0x1FF, LOW_PDPT_PA | user)
    entry(LOW_PDPT_PA, (USER_VA >> 30) & 0x1FF, LOW_PD_PA | user)
    entry(LOW_PD_PA, (USER_VA >> 21) & 0x1FF, LOW_PT_PA | user)
    entry(LOW_PT_PA, (USER_VA >> 12) & 0x1FF, USER_PA | user)
    return bytes(ram)


def bp_key(type: BreakpointType | int, addr: int, length: int) -> tuple[int, int, int]:
    return (int(type), addr, length)


class FakeDriver(Driver):
    """See the module docstring. Tests drive run control with `queue_stop`."""

    name = "fake"

    def __init__(
        self,
        ncpus: int = 2,
        *,
        kvm: bool = False,
        ram_size: int = RAM_SIZE,
        pipe: bool = False,
        insn_len: int = 3,
        time_mode: str = "icount",
    ) -> None:
        self.accel = "kvm" if kvm else "tcg"
        self.capabilities = kvm_capabilities() if kvm else tcg_capabilities(time_mode)
        self._cpus = list(range(1, ncpus + 1))
        self.ram = bytearray(initial_ram(ram_size))
        self.regs: dict[int, RegisterFile] = {
            cpu: RegisterFile.from_qemu_g(_default_payload(cpu)) for cpu in self._cpus
        }
        self.insn_len = insn_len  # how far a simulated step moves rip
        self.lost_steps = 0  # that many next steps leave rip where it was (QEMU's quirk)
        self.fail_resume = 0  # that many next resume() calls raise DriverError
        # Records.
        self.calls: list[tuple[str, tuple]] = []
        self.bp_calls: list[tuple[str, BreakpointType, int, int]] = []
        self.installed: set[tuple[int, int, int]] = set()
        self.patched: set[tuple[int, int, int]] = set()  # KVM fallback breakpoints (0xCC in RAM)
        self.resumes: list[dict[int, str]] = []
        self.register_writes: list[tuple[int, int, bytes]] = []
        self.writes: list[tuple[int, bytes]] = []
        self.violations: list[str] = []
        self.interrupts = 0
        self.killed = False
        self.closed = False
        # Run state.
        self.running = False
        self.stops: deque[DriverStop] = deque()
        self._pipe: tuple[int, int] | None = None
        if pipe:
            r, w = os.pipe()
            os.set_blocking(r, False)
            self._pipe = (r, w)

    # -- helpers for tests ------------------------------------------------------------------------

    def _violate(self, what: str, exc: type[Exception] = DriverError) -> None:
        self.violations.append(what)
        raise exc(f"contract violation: {what}")

    def va_to_pa(self, va: int, cpu: int = 1) -> int:
        """Translate with cpu's page tables (independently of the debugger's own translator)."""
        where = translate(self._peek, self.reg(cpu, "cr3"), va, PagingMode.LONG4)
        if not isinstance(where, Translation):
            raise KeyError(f"{va:#x} is not mapped: {where.reason}")
        return where.pa

    def _peek(self, pa: int, length: int) -> bytes:
        if pa < 0 or pa + length > len(self.ram):
            raise PhysicalMemoryError(f"{pa:#x}")
        return bytes(self.ram[pa : pa + length])

    def peek_virtual(self, va: int, length: int, cpu: int = 1) -> bytes:
        return b"".join(self._peek(self.va_to_pa(va + i, cpu), 1) for i in range(length))

    def poke_virtual(self, va: int, data: bytes, cpu: int = 1) -> None:
        """Place bytes in guest memory behind the debugger's back (no call is recorded)."""
        for i, byte in enumerate(data):
            self.ram[self.va_to_pa(va + i, cpu)] = byte

    def reg(self, cpu: int, name: str) -> int:
        return self.regs[cpu][name]

    def set_reg(self, cpu: int, name: str, value: int) -> None:
        size = _SIZES[name]
        regnum = REGISTER_INDEX[name]
        self.regs[cpu] = self.regs[cpu].with_value(regnum, value.to_bytes(size, "little"))

    def queue_stop(self, *stops: DriverStop) -> None:
        for stop in stops:
            self.stops.append(stop)
            if self._pipe is not None:
                os.write(self._pipe[1], b"!")

    def installed_keys(self) -> set[tuple[int, int, int]]:
        return set(self.installed)

    def count(self, name: str) -> int:
        return sum(1 for call, _ in self.calls if call == name)

    # -- Driver -----------------------------------------------------------------------------------

    def cpus(self) -> list[int]:
        return list(self._cpus)

    def read_physical(self, pa: int, length: int) -> bytes:
        self.calls.append(("read_physical", (pa, length)))
        if pa < 0 or length < 0 or pa > _U64:
            self._violate(f"read_physical({pa:#x}, {length})", PhysicalMemoryError)
        if pa + length > len(self.ram):
            raise PhysicalMemoryError(f"{pa:#x}+{length:#x} is outside RAM")
        return bytes(self.ram[pa : pa + length])

    def write_physical(self, pa: int, data: bytes) -> None:
        self.calls.append(("write_physical", (pa, bytes(data))))
        if pa < 0 or pa > _U64 or not data:
            self._violate(f"write_physical({pa:#x}, {len(data)} bytes)")
        if pa + len(data) > len(self.ram):
            raise DriverError(f"write at {pa:#x}+{len(data):#x} is outside RAM")
        self.ram[pa : pa + len(data)] = data
        self.writes.append((pa, bytes(data)))

    def _check_cpu(self, cpu: int, what: str) -> None:
        if cpu not in self._cpus:
            self._violate(f"{what} of unknown vCPU {cpu!r}")

    def read_registers(self, cpu: int) -> RegisterFile:
        self.calls.append(("read_registers", (cpu,)))
        self._check_cpu(cpu, "read_registers")
        return self.regs[cpu]

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        self.calls.append(("write_register", (cpu, regnum, bytes(value))))
        self._check_cpu(cpu, "write_register")
        if not 0 <= regnum < len(REGISTERS):
            self._violate(f"write_register regnum {regnum}")
        if len(value) != REGISTERS[regnum].bitsize // 8:
            self._violate(f"write_register({regnum}) with {len(value)} bytes")
        self.regs[cpu] = self.regs[cpu].with_value(regnum, bytes(value))
        self.register_writes.append((cpu, regnum, bytes(value)))

    def _check_bp(self, what: str, type: BreakpointType, addr: int, length: int) -> None:
        if not isinstance(type, BreakpointType):
            self._violate(f"{what} with type {type!r}")
        if not 0 <= addr <= _U64:
            self._violate(f"{what} at address {addr:#x}")
        if not 0 < length <= 16:
            self._violate(f"{what} with length {length}")

    def insert_breakpoint(
        self,
        type: BreakpointType,
        addr: int,
        length: int,
        mechanism: str | None = None,
        scope_cr3: int | None = None,
    ) -> None:
        self.calls.append(("insert_breakpoint", (type, addr, length)))
        self.bp_calls.append(("insert", type, addr, length))
        self._check_bp("insert_breakpoint", type, addr, length)
        key = bp_key(type, addr, length)
        if key in self.installed:
            self._violate(f"insert_breakpoint of {key} already inserted")
        if mechanism is not None:
            self.patched.add(key)  # QEMU/KVM would write 0xCC into guest RAM for this one
        elif self.accel == "kvm" and len(self.installed - self.patched) >= HW_SLOTS:
            # What QEMU/KVM does with a fifth debug-register request (-ENOBUFS).
            raise DriverError("no free hardware debug register")
        self.installed.add(key)

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> None:
        self.calls.append(("remove_breakpoint", (type, addr, length)))
        self.bp_calls.append(("remove", type, addr, length))
        self._check_bp("remove_breakpoint", type, addr, length)
        key = bp_key(type, addr, length)
        if key not in self.installed:
            self._violate(f"remove_breakpoint of {key} never inserted")
        self.installed.discard(key)
        self.patched.discard(key)

    def resume(self, actions: dict[int, str]) -> None:
        self.calls.append(("resume", (dict(actions),)))
        if self.fail_resume:
            self.fail_resume -= 1
            raise DriverError("the hypervisor refused to resume")
        if self.running:
            self._violate("resume while running")
        if not actions:
            self._violate("resume with no vCPU")
        for cpu, action in actions.items():
            self._check_cpu(cpu, "resume")
            if action not in ("c", "s"):
                self._violate(f"resume action {action!r}")
        self.resumes.append(dict(actions))
        self.running = True
        for cpu, action in actions.items():
            if action == "s":
                if self.lost_steps:
                    self.lost_steps -= 1
                else:
                    self.set_reg(cpu, "rip", (self.reg(cpu, "rip") + self.insn_len) & _U64)

    def stop_fileno(self) -> int:
        return -1 if self._pipe is None else self._pipe[0]

    def _take(self) -> DriverStop:
        stop = self.stops.popleft()
        if self._pipe is not None:
            try:
                os.read(self._pipe[0], 1)
            except BlockingIOError:
                pass
        self.running = False
        return stop

    def poll_stop(self) -> DriverStop | None:
        self.calls.append(("poll_stop", ()))
        if not self.stops:
            return None
        return self._take()

    def interrupt(self) -> None:
        self.calls.append(("interrupt", ()))
        self.interrupts += 1
        self.queue_stop(DriverStop(cpu=self._cpus[0], signal=2))

    def wait_stop(self, timeout: float) -> DriverStop:
        self.calls.append(("wait_stop", (timeout,)))
        if not self.stops:
            raise TimeoutError("no stop scripted")
        return self._take()

    def kill(self) -> None:
        self.calls.append(("kill", ()))
        self.killed = True
        self.running = False

    def close(self) -> None:
        self.calls.append(("close", ()))
        self.closed = True
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def describe(self) -> list[tuple[str, str]]:
        return [("driver", f"fake ({self.accel})"), ("vcpus", str(len(self._cpus)))]
