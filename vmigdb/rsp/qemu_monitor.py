"""QEMU's read-only monitor commands, answered by vmigdb itself (never passed to QEMU).

GEF and pwndbg take vmigdb for QEMU's system gdbstub (it answers `Qqemu.sstepbits` as QEMU does)
and then read the machine through QEMU's human monitor: `monitor info mem` for the memory map,
`info registers` for system registers. vmigdb serves those read-only commands from its own page
walk and register reads, in QEMU's formats (`vmigdb.rsp.qemu_format`), for the address space GDB
reads through (the scoped process's while one is scoped). A QEMU command that would change the
machine or its host (reset, stop, savevm, chardev-add, device_add...) is refused with a reason: no
monitor command ever reaches QEMU.
"""

from __future__ import annotations

from collections.abc import Callable

from vmigdb.arch.x86_64.paging import Fault, PhysicalMemoryError
from vmigdb.debugger.engine import Debugger
from vmigdb.rsp.qemu_format import (
    FormatError,
    Formats,
    info_mem,
    info_registers,
    info_tlb,
    memory_dump,
)

# QEMU monitor commands that change the machine, its devices or its host; refused by name.
CHANGES_THE_VM = frozenset(
    "system_reset system_powerdown system_wakeup stop cont c quit q savevm loadvm delvm migrate "
    "migrate_cancel sendkey nmi mce set_link chardev-add chardev-remove chardev-change device_add "
    "device_del drive_add drive_del netdev_add netdev_del object_add object_del qom-set "
    "balloon boot_set change eject block_resize commit snapshot_blkdev memsave pmemsave "
    "dump-guest-memory screendump wavcapture gdbserver singlestep i o cpu cpu-add "
    "hostfwd_add hostfwd_remove watchdog_action log logfile trace-event ringbuf_write "
    "x_colo_lost_heartbeat announce_self calc_dirty_rate sync-profile".split()
)

INFO_COMMANDS = {
    "mem": "the mapped ranges of the address space, merged by permission (QEMU's format)",
    "tlb": "every present page of the address space and its entry's flags (QEMU's format)",
    "registers": "the current vCPU's registers vmigdb knows (QEMU's format)",
}


class QemuMonitorError(Exception):
    """The command cannot be served; the message says why (and what to use instead)."""


class QemuMonitor:
    def __init__(self, debugger: Debugger, current_cpu: Callable[[], int]) -> None:
        self._debugger = debugger
        self._current_cpu = current_cpu
        self._formats = Formats()  # x/xp remember their last format and size, as QEMU's do

    def info(self, args: list[str]) -> str:
        """`info mem|tlb|registers`."""
        what = args[0]
        if what not in INFO_COMMANDS or len(args) > 1:
            known = ", ".join(f"info {name}" for name in INFO_COMMANDS)
            raise QemuMonitorError(
                f"unknown command: 'info {' '.join(args)}' (vmigdb serves {known})"
            )
        cpu = self._current_cpu()
        if what == "registers":
            return info_registers(self._debugger.registers(cpu))
        mode, pages = self._debugger.mappings(cpu)
        return info_mem(pages, mode) if what == "mem" else info_tlb(pages, mode)

    def examine(self, args: list[str], *, physical: bool) -> str:
        """`x` (virtual) / `xp` (physical) `[/fmt] ADDR`."""
        name = "xp" if physical else "x"
        fmt = args[0] if args and args[0].startswith("/") else None
        rest = args[1:] if fmt is not None else args
        if len(rest) != 1:
            raise QemuMonitorError(f"usage: monitor {name} /fmt ADDR")
        try:
            count, style, size = self._formats.parse(fmt)
        except FormatError as exc:
            raise QemuMonitorError(str(exc)) from None
        addr = self._value(rest[0])
        if count * size > 0x10000:
            raise QemuMonitorError(f"{name}: at most 64 KiB at a time (GDB's x reads more)")
        read = self._read_physical if physical else self._read_virtual
        self._debugger.policy.record("memory read", self._debugger.driver.capabilities.memory_read)
        return memory_dump(read, addr, count, style, size)

    def gva2gpa(self, args: list[str]) -> str:
        if len(args) != 1:
            raise QemuMonitorError("usage: monitor gva2gpa ADDR")
        where = self._debugger.translate(self._current_cpu(), self._value(args[0]))
        if isinstance(where, Fault):
            return "Unmapped"
        return f"gpa: {where.pa:#x}"

    def _value(self, text: str) -> int:
        """A number, or `$reg` (a register of the current vCPU), as QEMU's monitor takes them."""
        if text.startswith("$"):
            regs = self._debugger.registers(self._current_cpu())
            try:
                return regs[text[1:].lower()]
            except KeyError:
                raise QemuMonitorError(f"unknown register {text!r}") from None
        return _number(text)

    def _read_virtual(self, addr: int, length: int) -> bytes:
        cpu = self._current_cpu()
        out = b""
        while len(out) < length:
            where = self._debugger.translate(cpu, addr + len(out))
            if isinstance(where, Fault):
                break
            chunk = min(length - len(out), 0x1000 - ((addr + len(out)) & 0xFFF))
            try:
                out += self._debugger.driver.read_physical(where.pa, chunk)
            except PhysicalMemoryError:
                break
        return out

    def _read_physical(self, addr: int, length: int) -> bytes:
        try:
            return self._debugger.driver.read_physical(addr, length)
        except PhysicalMemoryError:
            return b""


def _number(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 64:
        raise QemuMonitorError(f"not an address: {text!r} (use 0x... or decimal)")
    return value
