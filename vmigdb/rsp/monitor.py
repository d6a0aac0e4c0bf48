"""`monitor` commands (qRcmd): text in, text out, over the debugger's model.

Each command is a method `cmd_<name>(args) -> str`; its docstring's first line is its help. A usage
error raises `MonitorError`, which the session sends as console text followed by an error reply, so
GDB prints the message and scripts see the command fail.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from vmigdb.arch.x86_64.paging import Fault
from vmigdb.arch.x86_64.registers import REGISTERS
from vmigdb.debugger import processes
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.guest_view import GuestUnavailable, GuestView
from vmigdb.debugger.snapshots import SnapshotError
from vmigdb.guest.base import GuestError

T = TypeVar("T")


class MonitorError(Exception):
    """A monitor command was misused; the message says how to use it."""


@dataclass(frozen=True)
class LongCommand:
    """A command that takes seconds (a snapshot): the server runs `run` while GDB waits for the
    answer, and keeps GDB from timing out meanwhile. `run` returns the text, or raises
    MonitorError."""

    run: Callable[[], Awaitable[str]]


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
        self, debugger: Debugger, current_cpu: Callable[[], int], *, host_files: bool = True
    ) -> None:
        self._debugger = debugger
        self._current_cpu = current_cpu  # the vCPU GDB's requests are about (the session knows)
        self._host_files = host_files  # may commands write files on vmigdb's host?

    def run(self, line: str) -> str | LongCommand:
        words = line.split()
        if not words:
            return self.cmd_help([])
        handler = getattr(self, f"cmd_{words[0].replace('-', '_')}", None)
        if handler is None:
            raise MonitorError(f"unknown monitor command {words[0]!r}; try 'monitor help'")
        return handler(words[1:])

    def _commands(self) -> list[tuple[str, str]]:
        out = []
        for name in sorted(dir(self)):
            if name.startswith("cmd_"):
                doc = (getattr(self, name).__doc__ or "").strip().splitlines()[0]
                out.append((name[4:].replace("_", "-"), doc))
        return out

    def cmd_help(self, args: list[str]) -> str:
        """help — list the monitor commands"""
        return "\n".join(f"  {doc}" for _, doc in self._commands())

    def cmd_info(self, args: list[str]) -> str:
        """info — what vmigdb is attached to and how"""
        dbg = self._debugger
        lines = [f"{label}: {value}" for label, value in dbg.driver.describe()]
        lines.append(f"state: {'running' if dbg.running else 'stopped'}")
        lines.append(f"current vCPU: CPU#{self._current_cpu() - 1}")
        lines.append(
            "addresses: " + ("guest-physical (phys on)" if dbg.physical_addresses else "virtual")
        )
        lines.append(
            f"breakpoints: {len(dbg.breakpoints.desired)} requested, "
            f"{len(dbg.breakpoints.installed)} held by the hypervisor"
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
        """process PID|NAME|kernel|all — debug one process's address space (or the whole machine)"""
        if len(args) != 1:
            raise MonitorError("usage: monitor process PID|NAME|kernel|all")
        which = args[0]
        if which in ("kernel", "all"):
            self._debugger.set_scope(None)
            return (
                "scope: the whole machine; new breakpoints fire in every process"
                if which == "all"
                else "scope: the kernel; memory through the current vCPU's page tables"
            )
        try:
            scope = self._guest(lambda guest: processes.scope_for(guest, which))
        except processes.ProcessNotFound as exc:
            raise MonitorError(str(exc)) from None
        self._debugger.set_scope(scope)
        return (
            f"scope: process {scope.pid} ({scope.comm}), page tables at {scope.cr3:#x}; "
            "its user memory reads through them, new breakpoints fire only in it"
        )

    def cmd_snapshot(self, args: list[str]) -> LongCommand:
        """snapshot save|load|delete NAME, snapshot list — whole-VM snapshots (detonation loops)"""
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

        return LongCommand(run)

    def cmd_catch(self, args: list[str]) -> str:
        """catch [panic on|off] — stop GDB when the guest kernel oopses or panics (on by default)"""
        health = self._debugger.health
        if not args:
            return f"panic: {health.status}"
        if len(args) != 2 or args[0] != "panic" or args[1] not in ("on", "off"):
            raise MonitorError("usage: monitor catch [panic on|off]")
        health.enabled = args[1] == "on"
        return f"panic: {health.arm()}"

    def _guest(self, query: Callable[[GuestView], T]) -> T:
        """Run a guest-awareness query; an unanalysable guest, or OS data that cannot be read
        (a list changing under the walk, a structure the kernel lacks), is a one-line error."""
        try:
            return query(self._debugger.guest)
        except GuestUnavailable as exc:
            raise MonitorError(str(exc)) from None
        except GuestError as exc:
            raise MonitorError(f"cannot read it from the guest: {exc}") from None

    def cmd_stealth(self, args: list[str]) -> str:
        """stealth — the stealth mode, every mechanism the driver declares, its visibility, its use"""
        driver = self._debugger.driver
        return "\n".join([f"driver: {driver.name}", *self._debugger.policy.describe()])

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

    def cmd_regs(self, args: list[str]) -> str:
        """regs — the current vCPU's general and system registers"""
        regs = self._debugger.registers(self._current_cpu())
        names = [r.name for r in REGISTERS if r.bitsize <= 64 and not r.name.startswith("f")]
        names = [n for n in names if not n.startswith("st")]
        rows = [f"{name:>9} {regs[name]:#018x}" for name in names]
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
