"""`monitor` commands (qRcmd): text in, text out, over the debugger's model.

Each command is a method `cmd_<name>(args) -> str`; its docstring's first line is its help. A usage
error raises `MonitorError`, which the session sends as console text followed by an error reply, so
GDB prints the message and scripts see the command fail.

A command that takes a while and runs on the event loop (`monitor dump`: QEMU writes the whole guest
through QMP) returns `Later` instead: the server awaits its work with the machine stopped and GDB's
other packets held, then sends its text (GDB waits for a `qRcmd` answer as long as it takes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from vmigdb.arch.x86_64.pagemap import canonical
from vmigdb.arch.x86_64.paging import Fault
from vmigdb.arch.x86_64.registers import REGISTERS
from vmigdb.debugger import processes
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.guest_view import GuestUnavailable, GuestView
from vmigdb.debugger.model import ProcessScope
from vmigdb.debugger.snapshots import SnapshotError
from vmigdb.errors import VmigdbError
from vmigdb.guest.base import GuestError
from vmigdb.hv.base import DriverError
from vmigdb.rsp.monitor_catch import CatchCommand, CatchUsage
from vmigdb.rsp.qemu_monitor import CHANGES_THE_VM, INFO_COMMANDS, QemuMonitor, QemuMonitorError

T = TypeVar("T")

SaveMachine = Callable[[str], Awaitable[str]]
"""``await save(path) -> str``: write a consistent dump of the whole stopped machine (all RAM,
every vCPU's registers) to a new, owner-only file *path*; returns what to tell the user. Raises
`VmigdbError` with the reason when it cannot. Given by what opened the machine (`Target`)."""


class MonitorError(Exception):
    """A monitor command was misused; the message says how to use it."""


@dataclass(frozen=True)
class Later:
    """A command's answer that takes a while: `note` is shown at once (on a line it leaves open
    for progress dots), then `work` is awaited (it returns the text, or raises `MonitorError`)."""

    note: str
    work: Coroutine[Any, Any, str]


def _parse_addr(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 64:
        raise MonitorError(f"not an address: {text!r} (use 0x... or decimal)")
    return value


class Monitor:
    def __init__(
        self,
        debugger: Debugger,
        current_cpu: Callable[[], int],
        *,
        host_files: bool = True,
        save_machine: SaveMachine | None = None,
    ) -> None:
        self._debugger = debugger
        self._current_cpu = current_cpu  # the vCPU GDB's requests are about (the session knows)
        self._host_files = host_files  # may commands write files on vmigdb's host?
        self._qemu = QemuMonitor(debugger, current_cpu)
        self._save_machine = save_machine  # `monitor dump`, where the hypervisor can
        self._catch = CatchCommand(debugger, self._scope_cr3)

    def run(self, line: str) -> str | Later:
        words = line.split()
        if not words:
            return self.cmd_help([])
        handler = getattr(self, f"cmd_{words[0].replace('-', '_')}", None)
        if handler is None:
            if words[0] in CHANGES_THE_VM:
                raise MonitorError(
                    f"{words[0]!r} is a QEMU monitor command that would change the machine or its "
                    "host: vmigdb never passes monitor commands to QEMU, and serves only the "
                    "read-only ones (see 'monitor help')"
                )
            raise MonitorError(f"unknown command: {words[0]!r}; try 'monitor help'")
        try:
            return handler(words[1:])
        except QemuMonitorError as exc:
            raise MonitorError(str(exc)) from None

    def _commands(self) -> list[tuple[str, str]]:
        out = []
        for name in sorted(dir(self)):
            if name.startswith("cmd_"):
                doc = (getattr(self, name).__doc__ or "").strip().splitlines()[0]
                out.append((name[4:].replace("_", "-"), doc))
        return out

    def cmd_help(self, args: list[str]) -> str:
        """help — list the monitor commands"""
        lines = [f"  {doc}" for _, doc in self._commands()]
        lines += [f"  info {name} — {doc}" for name, doc in INFO_COMMANDS.items()]
        return "\n".join(sorted(lines))

    def cmd_info(self, args: list[str]) -> str:
        """info — what vmigdb is attached to and how"""
        if args:
            return self._qemu.info(args)
        dbg = self._debugger
        lines = [f"{label}: {value}" for label, value in dbg.driver.describe()]
        if not dbg.driver.capabilities.run_control:
            lines.append("state: stopped for good (a saved machine: it never runs)")
        else:
            lines.append(f"state: {'running' if dbg.running else 'stopped'}")
        lines.append(f"current vCPU: CPU#{self._current_cpu() - 1}")
        lines.append(
            "addresses: " + ("guest-physical (phys on)" if dbg.physical_addresses else "virtual")
        )
        lines.append(
            f"breakpoints: {len(dbg.breakpoints.desired)} requested, "
            f"{len(dbg.breakpoints.installed)} held by the hypervisor"
        )
        scope = dbg.scope
        lines.append(
            f"scope: process {scope.pid} ({scope.comm}), page tables at {scope.cr3:#x}"
            if scope is not None
            else "scope: the whole machine"
        )
        armed = [c for c in dbg.catchpoints.kinds() if c.armed]
        lines.append(
            "catchpoints: " + ("; ".join(f"{c.kind} {c.status()}" for c in armed) or "none armed")
        )
        try:
            lines += [f"{label}: {value}" for label, value in dbg.guest.os().describe()]
        except GuestUnavailable as exc:
            lines.append(f"guest: {exc}")
        return "\n".join(lines)

    def cmd_sym(self, args: list[str]) -> str:
        """sym NAME — the address of a kernel symbol (from the guest's own kallsyms)"""
        if len(args) != 1:
            raise MonitorError("usage: monitor sym NAME")
        symbol = self._guest(lambda guest: guest.os().lookup_symbol(args[0]))
        if symbol is None:
            raise MonitorError(f"no kernel symbol named {args[0]!r}")
        return f"{symbol.name} {symbol.address:#x}"

    def cmd_ps(self, args: list[str]) -> str:
        """ps — the guest's processes: pid, ppid, comm, cr3 (read from guest memory)"""
        scope = self._debugger.scope
        lines = [f"{'PID':>7} {'PPID':>7} {'COMM':<16} {'CR3':<18} STATE"]
        for p in self._guest(processes.list_processes):
            mark = "*" if scope is not None and scope.pid == p.pid else " "
            cr3 = f"{p.cr3:#x}" if p.cr3 is not None else "-"
            lines.append(f"{p.pid:>7} {p.ppid:>7} {p.comm:<16} {cr3:<18} {p.state}{mark}")
        return "\n".join(lines)

    def cmd_lsmod(self, args: list[str]) -> str:
        """lsmod — the guest kernel's loaded modules"""
        found = self._guest(processes.list_modules)
        lines = [f"{'MODULE':<24} {'BASE':<18} SIZE"]
        lines += [f"{m.name:<24} {m.base:#018x} {m.size:#x}" for m in found]
        if not found:
            lines.append("(no modules loaded)")
        return "\n".join(lines)

    def cmd_process(self, args: list[str]) -> str:
        """process PID|NAME|cr3=ADDR|kernel|all — debug one process's address space (or the whole machine)"""
        if len(args) != 1:
            raise MonitorError("usage: monitor process PID|NAME|cr3=ADDR|kernel|all")
        which = args[0]
        if which.startswith("cr3="):
            # An address space by its page tables alone: for a guest vmigdb cannot analyse.
            cr3 = _parse_addr(which[4:])
            self._debugger.set_scope(ProcessScope(None, "", cr3))
            return (
                f"scope: the address space with page tables at {cr3:#x}; "
                "its memory reads through them, new breakpoints fire only in it"
            )
        if which in ("kernel", "all"):
            was = self._debugger.scope
            self._debugger.set_scope(None)
            said = (
                "scope: the whole machine; new breakpoints fire in every process"
                if which == "all"
                else "scope: the kernel; memory through the current vCPU's page tables"
            )
            if was is None or was.pid is None:
                return said
            # GDB reads the library list only at a stop (or when asked): until then it holds
            # the process's, and a breakpoint set in their range is one GDB disables on reading.
            return (
                f"{said}\n(GDB still lists {was.comm}'s libraries until the next stop: "
                "'sharedlibrary' drops them now; GDB disables a breakpoint set in their range "
                "before it does)"
            )
        try:
            scope = self._guest(lambda guest: processes.scope_for(guest, which))
        except processes.ProcessNotFound as exc:
            raise MonitorError(str(exc)) from None
        self._debugger.set_scope(scope)
        return (
            f"scope: process {scope.pid} ({scope.comm}), page tables at {scope.cr3:#x}; "
            "its user memory reads through them, new breakpoints fire only in it\n"
            "(its libraries: 'sharedlibrary' loads their symbols now, GDB does by itself at the "
            "next stop)"
        )

    def _refuse_at_plugin_hold(self, what: str) -> None:
        """QEMU saves the machine by stopping it (vm_stop), which waits forever for a vCPU that
        vmigdb's plugin holds inside a callback."""
        if getattr(self._debugger.driver, "plugin_holds", False):
            raise MonitorError(
                "vmigdb's QEMU plugin holds this stop inside QEMU, which cannot stop the VM for "
                f"{what} meanwhile: continue, then stop with ^C (a stop QEMU's gdbstub holds)"
            )

    def cmd_snapshot(self, args: list[str]) -> Later:
        """snapshot save|load|delete NAME, snapshot list — whole-VM snapshots (detonation loops)"""
        self._refuse_at_plugin_hold("a snapshot")
        verb = args[0] if args else ""
        if not (verb == "list" and len(args) == 1) and not (
            verb in ("save", "load", "delete") and len(args) == 2
        ):
            raise MonitorError("usage: monitor snapshot save|load|delete NAME, or snapshot list")
        name = args[1] if len(args) == 2 else ""
        if name and not all(c.isalnum() or c in "-_.:" for c in name):
            raise MonitorError(f"snapshot names use letters, digits and -_.: only, not {name!r}")
        snapshots = self._debugger.snapshots

        async def run() -> str:
            try:
                if verb == "save":
                    seconds = await snapshots.save(name)
                    return f"snapshot {name} saved in {seconds:.2f} s"
                if verb == "delete":
                    seconds = await snapshots.delete(name)
                    return f"snapshot {name} deleted in {seconds:.2f} s"
                if verb == "list":
                    return _snapshot_table(await snapshots.list())
                loaded = await snapshots.load(name)
            except SnapshotError as exc:
                raise MonitorError(str(exc)) from None
            lines = [
                f"snapshot {name} loaded in {loaded.seconds:.2f} s: the guest is at its state.",
                "GDB shows the old state until its next stop: `continue` or `stepi` stops at "
                "once at the snapshot's state, with no guest code run.",
            ]
            if loaded.scope_note:
                lines.append(loaded.scope_note)
            if loaded.caveat:
                lines.append(f"note: {loaded.caveat}")
            return "\n".join(lines)

        note = f"snapshot {verb} {name}".rstrip() + " "
        return Later(note, run())

    def cmd_catch(self, args: list[str]) -> str:
        """catch [KIND ...|off] — stop on panic, exec NAME, module [NAME], the driver's own kinds"""
        try:
            return self._catch.run(args)
        except CatchUsage as exc:
            raise MonitorError(str(exc)) from None

    def _scope_cr3(self, which: str) -> int:
        """The page tables of a process named by PID (or given as cr3=ADDR)."""
        if which.startswith("cr3="):
            return _parse_addr(which[4:])
        if not (which.isascii() and which.isdigit()):
            raise MonitorError(f"not a process: {which!r} (a PID, or cr3=ADDR)")
        try:
            scope = self._guest(lambda guest: processes.scope_for(guest, which))
        except processes.ProcessNotFound as exc:
            raise MonitorError(str(exc)) from None
        return scope.cr3

    def cmd_maps(self, args: list[str]) -> str:
        """maps [PID] — a process's memory map, as /proc/PID/maps (default: the scoped process)"""
        if len(args) > 1 or (args and not args[0].isdigit()):
            raise MonitorError("usage: monitor maps [PID]")
        if args:
            pid = int(args[0])
        elif self._debugger.scope is not None:
            pid = self._debugger.scope.pid
        else:
            raise MonitorError("monitor maps PID (no process is in scope)")
        found = self._guest(lambda guest: guest.os().mappings(pid))
        return "\n".join(m.line() for m in found)

    def _guest(self, query: Callable[[GuestView], T]) -> T:
        """Run a guest-awareness query; an unanalysable guest, or OS data that cannot be read
        (a list changing under the walk, a structure the kernel lacks), is a one-line error."""
        try:
            return query(self._debugger.guest)
        except GuestUnavailable as exc:
            raise MonitorError(str(exc)) from None
        except GuestError as exc:
            raise MonitorError(f"cannot read it from the guest: {exc}") from None

    def cmd_plugin_breakpoints(self, args: list[str]) -> str:
        """plugin-breakpoints [on|off] — plain breakpoints held in QEMU by vmigdb's plugin (on:
        fast steps, no register writes or snapshots at their stops) or QEMU's gdbstub's (off)"""
        driver = self._debugger.driver
        if not getattr(driver, "has_plugin", False):
            raise MonitorError("no vmigdb plugin serves run control here (see 'monitor info')")
        if args:
            if args[0] not in ("on", "off") or len(args) > 1:
                raise MonitorError("usage: monitor plugin-breakpoints [on|off]")
            driver.plugin_breakpoints = args[0] == "on"
        where = "vmigdb's plugin" if driver.plugin_breakpoints else "QEMU's gdbstub"
        return (
            f"breakpoints without conditions or scope set from now on: {where} "
            "(conditional and scoped ones: always the plugin)"
        )

    def cmd_stealth(self, args: list[str]) -> str:
        """stealth — the stealth mode, every mechanism the driver declares, its visibility, its use"""
        driver = self._debugger.driver
        warnings = [f"warning: {text}" for text in driver.warnings()]
        return "\n".join([f"driver: {driver.name}", *warnings, *self._debugger.policy.describe()])

    def cmd_vtop(self, args: list[str]) -> str:
        """vtop ADDR — translate a virtual address with the current vCPU's page tables"""
        if len(args) != 1:
            raise MonitorError("usage: monitor vtop ADDR")
        va = _parse_addr(args[0])
        where = self._debugger.translate(self._current_cpu(), va)
        if isinstance(where, Fault):
            return f"{va:#x}: not mapped ({where.reason} at level {where.level})"
        flags = [
            f"{where.page_size // 1024}K page"
            if where.page_size < 1 << 20
            else f"{where.page_size >> 20}M page",
            "writable" if where.writable else "read-only",
            "user" if where.user else "supervisor",
            "nx" if where.nx else "exec",
        ]
        return f"{va:#x} -> {where.pa:#x} ({', '.join(flags)})"

    def cmd_dump_memory(self, args: list[str]) -> str:
        """dump-memory FILE ADDR LEN — write guest memory to a file on vmigdb's host, at RAM speed"""
        if len(args) != 3:
            raise MonitorError("usage: monitor dump-memory FILE ADDR LEN")
        if not self._host_files:
            raise MonitorError(
                "dump-memory writes files on vmigdb's host: refused while serving a non-loopback "
                "address"
            )
        path, addr, length = args[0], _parse_addr(args[1]), _parse_addr(args[2])
        if addr + length > 1 << 64:
            raise MonitorError("the range runs past the end of the address space")
        start = time.perf_counter()
        try:
            with open(path, "wb") as out:
                unmapped = self._debugger.dump_memory(self._current_cpu(), addr, length, out)
        except OSError as exc:
            raise MonitorError(f"cannot write {path}: {exc.strerror or exc}") from None
        seconds = max(time.perf_counter() - start, 1e-9)
        note = f", {unmapped} unmapped bytes written as zeros" if unmapped else ""
        return (
            f"wrote {length} bytes from {addr:#x} to {path} in {seconds:.3f} s "
            f"({length / seconds / 1e6:.0f} MB/s){note}"
        )

    def cmd_xp(self, args: list[str]) -> str:
        """xp /FMT ADDR — guest-physical memory, as QEMU's xp prints it (FMT: count, x d u o c, b h w g)"""
        return self._qemu.examine(args, physical=True)

    def cmd_x(self, args: list[str]) -> str:
        """x /FMT ADDR — virtual memory of the debugged address space, as QEMU's x prints it"""
        return self._qemu.examine(args, physical=False)

    def cmd_gva2gpa(self, args: list[str]) -> str:
        """gva2gpa ADDR — the guest-physical address behind a virtual one (QEMU's format)"""
        return self._qemu.gva2gpa(args)

    def cmd_gpa2hva(self, args: list[str]) -> str:
        """gpa2hva ADDR — refused: host addresses are not served (pwndbg: set kernel-vmmap monitor)"""
        raise MonitorError(
            "gpa2hva: vmigdb does not expose the hypervisor's host addresses; read guest RAM "
            "with 'monitor xp' or 'monitor phys on' (pwndbg: 'set kernel-vmmap monitor')"
        )

    def cmd_pages(self, args: list[str]) -> str:
        """pages [user] — every present page of the debugged address space: VA PA SIZE PERMS"""
        if args not in ([], ["user"]):
            raise MonitorError("usage: monitor pages [user]")
        mode, pages = self._debugger.mappings(self._current_cpu())
        lines = [
            f"{canonical(p.va, mode) & ((1 << 64) - 1):#018x} {p.pa:#x} {p.size:#x} "
            f"{'u' if p.user else '-'}r{'w' if p.writable else '-'}{'-' if p.nx else 'x'}"
            for p in pages
            if p.user or not args
        ]
        return "\n".join(lines) if lines else "(no pages)"

    def cmd_ram(self, args: list[str]) -> str:
        """ram — the guest-physical RAM ranges (what `phys on` and `dump-memory` can read)"""
        try:
            ranges = self._debugger.driver.physical_ranges()
        except DriverError as exc:
            raise MonitorError(f"the driver cannot list guest RAM: {exc}") from None
        return "\n".join(
            f"{start:#018x}-{end:#018x} ({(end - start) >> 20} MiB)" for start, end in ranges
        )

    def cmd_dump(self, args: list[str]) -> Later:
        """dump FILE — save the whole stopped guest (RAM, every vCPU) for `vmigdb dump --image`"""
        if len(args) != 1:
            raise MonitorError("usage: monitor dump FILE")
        if not self._host_files:
            raise MonitorError(
                "dump writes files on vmigdb's host: refused while serving a non-loopback address"
            )
        driver = self._debugger.driver
        if self._save_machine is None:
            if not driver.capabilities.run_control:
                raise MonitorError("this machine is already a saved one: copy its image instead")
            raise MonitorError(f"the {driver.name} driver cannot save the machine")
        if self._debugger.running:
            raise MonitorError("the guest is running: stop it first")
        self._refuse_at_plugin_hold("a dump")
        path = os.path.abspath(args[0])
        if os.path.lexists(path):
            raise MonitorError(f"{path} exists: vmigdb never overwrites a file, name a new one")
        return Later(f"saving the guest to {path} ", self._save(path))

    async def _save(self, path: str) -> str:
        assert self._save_machine is not None
        try:
            return await self._save_machine(path)
        except VmigdbError as exc:
            raise MonitorError(str(exc)) from None

    def cmd_regs(self, args: list[str]) -> str:
        """regs — the current vCPU's general and system registers"""
        regs = self._debugger.state.registers(self._current_cpu())  # the vCPU's own
        # general, segment and system registers: no x87 (80-bit st, f* control) or SSE
        names = [
            r.name for r in REGISTERS if r.bitsize <= 64 and r.group not in ("float", "vector")
        ]
        unknown = {REGISTERS[i].name for i in regs.unavailable}
        rows = [
            f"{name:>9} {'<unavailable>' if name in unknown else f'{regs[name]:#018x}':<18}"
            for name in names
        ]
        return "\n".join("  ".join(rows[i : i + 3]) for i in range(0, len(rows), 3))

    def cmd_phys(self, args: list[str]) -> str:
        """phys on|off — treat GDB's memory addresses as guest-physical (on) or virtual (off)"""
        if args == ["on"]:
            self._debugger.physical_addresses = True
        elif args == ["off"]:
            self._debugger.physical_addresses = False
        elif args:
            raise MonitorError("usage: monitor phys on|off")
        state = (
            "on: addresses are guest-physical"
            if self._debugger.physical_addresses
            else ("off: addresses are virtual (current vCPU's page tables)")
        )
        return f"phys {state}"


def _snapshot_table(snapshots: list) -> str:
    if not snapshots:
        return "(no snapshots)"
    lines = [f"{'NAME':<20} {'VM STATE':>10} {'SAVED':<19} GUEST CLOCK"]
    for snap in snapshots:
        saved = datetime.fromtimestamp(snap.date).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{snap.name:<20} {snap.vm_state_size / (1 << 20):>7.1f} MiB {saved:<19} "
            f"{snap.vm_clock:.3f} s"
        )
    return "\n".join(lines)
