"""Scripted reversing sessions: a real GDB driving vmigdb, with Python values in and out.

    with Session.start("demo", append="vmigdb.programs=probe") as s:
        probe = next(p for p in s.processes() if p.name == "probe")
        s.on_break("do_sys_openat2", lambda stop: print(stop.read_string(stop.regs["rsi"])),
                   process=probe)
        s.run(timeout=5)

GDB does the debugging (symbols, expressions, breakpoints with target-side conditions, vmigdb's
monitor commands); this layer turns its MI records into values and its errors into `GdbError`
carrying GDB's message. Leaving the `with` block, normally or by any exception, interrupts a
running guest, detaches (vmigdb removes every breakpoint and lets the guest run) and ends GDB,
and the server too if the session started it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from vmigdb.script.asm import assemble, disassemble
from vmigdb.script.mi import GdbError, GdbTimeout, Mi
from vmigdb.script.server import Server
from vmigdb.script.types import (
    CR3_BASE_MASK,
    Breakpoint,
    Instruction,
    Mapping,
    Page,
    Process,
    Stop,
)

log = logging.getLogger("vmigdb.script")

_INFO_MEM = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16}) [0-9a-f]{16} ([u-])r([w-])")
_PAGES = re.compile(r"0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+) ([u-])r([w-])([x-])")
_RAM = re.compile(r"0x([0-9a-f]+)-0x([0-9a-f]+)")
_STOP_REASONS = {
    "breakpoint-hit": "breakpoint",
    "watchpoint-trigger": "watchpoint",
    "read-watchpoint-trigger": "watchpoint",
    "access-watchpoint-trigger": "watchpoint",
    "end-stepping-range": "step",
    "signal-received": "interrupt",
    "exited": "exited",
    "exited-normally": "exited",
    "exited-signalled": "exited",
}


def _int(text: str) -> int:
    return int(text.split()[0], 0)


class Session:
    """A GDB connected to one vmigdb server. See the module docstring."""

    def __init__(self, mi: Mi, server: Server | None = None) -> None:
        self._mi = mi
        self.server = server
        self._breakpoints: dict[int, Breakpoint] = {}
        self._register_names: list[str] | None = None
        self._processes: list[Process] | None = None
        self.last_stop: Stop | None = None

    # -- lifetime ---------------------------------------------------------------------------------

    @classmethod
    def connect(cls, address: str, *, gdb: str = "gdb", timeout: float = 60) -> Session:
        """Attach a new GDB to the vmigdb server at `address` (HOST:PORT or unix:PATH)."""
        mi = Mi(gdb)
        try:
            for setting in ("pagination off", "confirm off", "width 0", "mi-async on"):
                mi.command(f"-gdb-set {setting}")
            target = address.removeprefix("unix:")
            mi.command(f"-target-select remote {target}", timeout)
        except BaseException:
            mi.close()
            raise
        session = cls(mi)
        mi.stops.clear()  # the stop GDB reports on connecting is where the session starts
        return session

    @classmethod
    def start(
        cls,
        command: str = "demo",
        *,
        wait_for: str | None = None,
        gdb: str = "gdb",
        timeout: float = 120,
        **options: object,
    ) -> Session:
        """Start `vmigdb COMMAND` with the CLI's options (`kernel=`, `initrd=`, `smp=`, `append=`,
        `time=`, `stealth=`, `serial=`, `qemu_args=[...]`...) and connect to it; with `wait_for`,
        only once the guest's console shows that text (GDB attached stops the guest)."""
        server = Server.start(command, timeout=timeout, **options)
        try:
            if wait_for is not None:
                server.wait_console(wait_for, timeout)
            session = cls.connect(server.address, gdb=gdb, timeout=timeout)
        except BaseException:
            server.stop()
            raise
        session.server = server
        return session

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop a running guest, detach (every breakpoint goes, the guest runs on), end GDB and
        the server this session started. Safe to call twice; never raises."""
        try:
            if self._mi.running:
                self._interrupt()
            self._mi.command("-target-detach", timeout=30)
        except Exception:  # noqa: BLE001 - detaching is best effort; the server cleans up too
            log.warning("could not detach cleanly", exc_info=True)
        finally:
            self._mi.close()
            if self.server is not None:
                self.server.stop()
                self.server = None

    # -- GDB and vmigdb commands ------------------------------------------------------------------

    def execute(self, command: str, timeout: float = 30) -> str:
        """A GDB CLI command; returns what GDB printed. :raises GdbError:"""
        return self._mi.console(command, timeout)

    def monitor(self, command: str, timeout: float = 30) -> str:
        """A vmigdb monitor command; returns its output. :raises GdbError:"""
        return self.execute(f"monitor {command}", timeout)

    def evaluate(self, expression: str) -> int:
        """A GDB expression's value as an integer (`"$rsp + 8"`, `"sizeof(long)"`)."""
        payload, _ = self._mi.command(f"-data-evaluate-expression {_quote(expression)}")
        return _int(payload["value"])

    # -- memory and registers ---------------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """`n` bytes at virtual address `addr` (the scoped process's memory while one is
        scoped). :raises GdbError: if any of them cannot be read, with GDB's message."""
        if n <= 0:
            return b""
        try:
            payload, _ = self._mi.command(f"-data-read-memory-bytes {addr:#x} {n}", 120)
        except GdbError:
            payload = {"memory": []}
        data = bytearray()
        for block in payload.get("memory", []):
            if int(block["begin"], 16) != addr + len(data):
                break
            data += bytes.fromhex(block["contents"])
        if len(data) < n:
            self._raise_unreadable(addr + len(data))
        return bytes(data[:n])

    def _raise_unreadable(self, addr: int) -> None:
        """GDB's own message for the first byte it cannot read."""
        self._mi.command(f"-data-evaluate-expression {_quote(f'*(unsigned char*){addr:#x}')}")
        raise GdbError(f"Cannot access memory at address {addr:#x}")

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def read_string(self, addr: int, limit: int = 4096) -> str:
        """A NUL-terminated string (read a page at a time, never past `limit` bytes)."""
        out = bytearray()
        while len(out) < limit:
            chunk = min(limit - len(out), 0x1000 - ((addr + len(out)) & 0xFFF))
            data = self.read(addr + len(out), chunk)
            end = data.find(b"\0")
            if end >= 0:
                return (out + data[:end]).decode("utf-8", "replace")
            out += data
        return out.decode("utf-8", "replace")

    def write(self, addr: int, data: bytes) -> None:
        """Write guest memory (through the hypervisor: the guest sees exactly these bytes)."""
        if data:
            self._mi.command(f"-data-write-memory-bytes {addr:#x} {data.hex()}")

    def regs(self, cpu: int | None = None) -> dict[str, int]:
        """Registers of vCPU `cpu` (0-based, GDB's CPU#n; None: the current one), by GDB's
        names; vector and x87 registers, which are not plain integers, are left out."""
        if self._register_names is None:
            payload, _ = self._mi.command("-data-list-register-names")
            self._register_names = payload["register-names"]
        thread = "" if cpu is None else f"--thread {cpu + 1} "
        payload, _ = self._mi.command(f"-data-list-register-values {thread}--skip-unavailable x")
        out: dict[str, int] = {}
        for item in payload["register-values"]:
            name = self._register_names[int(item["number"])]
            try:
                out[name] = int(item["value"], 0)
            except ValueError:
                continue  # a vector/union register: {v4_float = ...}
        return out

    def symbol(self, name: str) -> int:
        """A symbol's address (kernel symbols come with the ELF vmigdb serves at connect)."""
        plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
        return self.evaluate(f"(unsigned long)&{name}" if plain else f"(unsigned long)&'{name}'")

    # -- guest OS ---------------------------------------------------------------------------------

    def processes(self) -> list[Process]:
        """The guest's processes, read from its memory now (`monitor ps`)."""
        found = []
        for line in self.monitor("ps").splitlines()[1:]:
            if len(line) < 53:
                continue
            cr3 = line[33:51].strip()
            found.append(
                Process(
                    pid=int(line[0:7]),
                    ppid=int(line[8:15]),
                    name=line[16:32].rstrip(),
                    cr3=int(cr3, 16) if cr3 != "-" else None,
                    state=line[52:].rstrip(" *"),
                )
            )
        self._processes = found
        return found

    def process(self, which: int | str) -> Process:
        """One process by pid or unique name. :raises LookupError:"""
        matches = [p for p in self.processes() if which in (p.pid, p.name)]
        if len(matches) != 1:
            raise LookupError(f"{len(matches)} processes match {which!r}")
        return matches[0]

    def process_of(self, cr3: int) -> Process | None:
        """The process whose page tables `cr3` points to (PCID and PTI bits ignored). The list
        is read again only when no known process matches."""
        base = cr3 & CR3_BASE_MASK
        for attempt in range(2):
            if self._processes is None or attempt:
                self.processes()
            for process in self._processes or []:
                if process.cr3 is not None and process.cr3 & CR3_BASE_MASK == base:
                    return process
        return None

    def scope(self, process: Process | int | None) -> str:
        """Read memory through `process`'s page tables and fire new breakpoints only in it
        (None: the whole machine again). Returns vmigdb's confirmation."""
        if process is None:
            return self.monitor("process all")
        pid = process.pid if isinstance(process, Process) else process
        return self.monitor(f"process {pid}")

    def maps(self) -> list[Mapping]:
        """The mapped ranges of the address space memory is read through (the scoped
        process's, else the current vCPU's), from its page tables."""
        return [
            Mapping(
                start=int(m.group(1), 16),
                end=int(m.group(2), 16),
                user=m.group(3) == "u",
                writable=m.group(4) == "w",
            )
            for m in _INFO_MEM.finditer(self.monitor("info mem", timeout=60))
        ]

    def pages(self, *, user: bool = False) -> list[Page]:
        """Every present page of the address space memory is read through, with its frame
        (`monitor pages`; only user pages with `user`): what maps a guest-physical address back
        to virtual ones."""
        return [
            Page(
                va=int(m.group(1), 16),
                pa=int(m.group(2), 16),
                size=int(m.group(3), 16),
                user=m.group(4) == "u",
                writable=m.group(5) == "w",
                nx=m.group(6) == "-",
            )
            for m in _PAGES.finditer(self.monitor("pages user" if user else "pages", timeout=120))
        ]

    def physical_ram(self) -> list[tuple[int, int]]:
        """Guest-physical RAM as (start, end) ranges (`monitor ram`)."""
        return [(int(a, 16), int(b, 16)) for a, b in _RAM.findall(self.monitor("ram"))]

    def dump(self, path: str, addr: int, length: int, *, physical: bool = False) -> str:
        """Write guest memory to `path` on vmigdb's host at RAM speed (`monitor dump-memory`;
        unmapped bytes become zeros). Returns vmigdb's report."""
        if physical:
            self.monitor("phys on")
        try:
            return self.monitor(f"dump-memory {path} {addr:#x} {length:#x}", timeout=300)
        finally:
            if physical:
                self.monitor("phys off")

    # -- breakpoints and running ------------------------------------------------------------------

    def on_break(
        self,
        location: int | str,
        callback: Callable[[Stop], object] | None = None,
        *,
        process: Process | int | None = None,
        condition: str | None = None,
    ) -> Breakpoint:
        """Stop at `location` (an address, or anything GDB's `break` takes) and call
        `callback(stop)`; the run goes on unless it returns True. `process` limits the
        breakpoint to one process (by its page tables, checked inside vmigdb: hits in other
        processes never reach GDB), `condition` is a GDB expression checked the same way."""
        where = f"*{location:#x}" if isinstance(location, int) else location
        conditions = []
        if process is not None:
            proc = process if isinstance(process, Process) else self.process(process)
            if proc.cr3 is None:
                raise ValueError(f"{proc.name} (pid {proc.pid}) is a kernel thread")
            conditions.append(f"(($cr3 & {CR3_BASE_MASK:#x}) == {proc.cr3:#x})")
        if condition:
            conditions.append(f"({condition})")
        args = f"-c {_quote(' && '.join(conditions))} " if conditions else ""
        payload, _ = self._mi.command(f"-break-insert {args}{_quote(where)}")
        number = int(payload["bkpt"]["number"])
        bp = Breakpoint(number, where, callback)
        self._breakpoints[number] = bp
        return bp

    def remove(self, bp: Breakpoint) -> None:
        self._mi.command(f"-break-delete {bp.number}")
        self._breakpoints.pop(bp.number, None)

    def run(
        self, until: Callable[[], bool] | int | str | None = None, timeout: float | None = None
    ) -> Stop:
        """Let the guest run, calling breakpoint callbacks, until one returns True, `until`
        (a predicate checked after each callback, or a location to stop at) is met, something
        else stops the machine (a watchpoint, the guest's end), or `timeout` seconds pass (the
        guest is then interrupted: reason "timeout")."""
        target = None
        if until is not None and not callable(until):
            target = self.on_break(until)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                self._mi.command("-exec-continue")
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                record = self._mi.wait_stopped(remaining)
                if record is None:
                    stop = self._interrupt()
                    stop.reason = "timeout"
                    return stop
                stop = self._stop(record)
                if target is not None and stop.breakpoint is target:
                    return stop
                bp = stop.breakpoint
                if bp is None or bp.callback is None:
                    return stop
                if bp.callback(stop):
                    return stop
                if callable(until) and until():
                    return stop
        finally:
            if target is not None:
                self.remove(target)

    def interrupt(self) -> Stop:
        """Stop the running guest now."""
        return self._interrupt()

    def stepi(self, cpu: int | None = None) -> Stop:
        """One instruction on vCPU `cpu` (None: the current one)."""
        thread = "" if cpu is None else f"--thread {cpu + 1} "
        self._mi.command(f"-exec-step-instruction {thread}".rstrip())
        record = self._mi.wait_stopped(60)
        if record is None:
            raise GdbTimeout("the step did not end in 60 s")
        return self._stop(record)

    def _interrupt(self) -> Stop:
        self._mi.command("-exec-interrupt")
        record = self._mi.wait_stopped(60)
        if record is None:
            raise GdbTimeout("the guest did not stop within 60 s of an interrupt")
        return self._stop(record)

    def _stop(self, record: dict[str, Any]) -> Stop:
        reason = _STOP_REASONS.get(record.get("reason", ""), record.get("reason", "stopped"))
        thread = record.get("thread-id")
        frame = record.get("frame") or {}
        bp = None
        if reason == "breakpoint":
            bp = self._breakpoints.get(int(record.get("bkptno", 0)))
            if bp is not None:
                bp.hits += 1
        stop = Stop(
            session=self,
            reason=reason,
            cpu=int(thread) - 1 if thread else None,
            address=int(frame["addr"], 16) if "addr" in frame else None,
            breakpoint=bp,
            record=record,
        )
        if stop.cpu is not None:
            self._mi.command(f"-thread-select {stop.cpu + 1}")
        self.last_stop = stop
        return stop

    # -- code -------------------------------------------------------------------------------------

    def disassemble(self, addr: int, n: int = 1) -> list[Instruction]:
        """`n` instructions at `addr`, decoded with capstone (fewer if memory ends first)."""
        data = b""
        for size in (n * 15, 0x1000 - (addr & 0xFFF)):
            try:
                data = self.read(addr, size)
                break
            except GdbError:
                continue
        return disassemble(data, addr, n)

    def assemble(self, code: str, addr: int = 0) -> bytes:
        """Machine code for `code` (Intel syntax, `;` between instructions) placed at `addr`."""
        return assemble(code, addr)

    def patch(self, addr: int, code: str) -> bytes:
        """Assemble `code` at `addr` and write it there: an explicit write the guest will see
        (`monitor stealth` lists memory writes as visible). Returns the bytes written."""
        data = assemble(code, addr)
        self.write(addr, data)
        return data


def _quote(text: str) -> str:
    """An MI c-string argument."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
