"""The QEMU driver's side of vmigdb's run-control plugin (plugin/runctl.c): its socket protocol,
the stops it reports, and the registers of the vCPUs it does not hold.

The plugin holds a vCPU inside an instruction callback when a breakpoint counts (its scope and
conditions decided in QEMU) or a step ends, and reports that vCPU's registers with the stop.
Under icount every vCPU runs on one QEMU thread, so that hold is an all-stop; QEMU's gdbstub
cannot be used while it lasts (any byte makes QEMU wait for the held vCPU), so the other vCPUs'
registers come from QEMU's monitor (`info registers -a`, served by QEMU's main loop, which the
hold does not block). Watchpoints are the plugin's as well: their stops carry the watched address.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmigdb.arch.x86_64.registers import QEMU_REGISTERS, REGISTER_INDEX, REGISTERS, RegisterFile
from vmigdb.hv.base import BreakpointType, DriverError, MachineGone

log = logging.getLogger("vmigdb.hv.qemu.runctl")

STEP, CONTINUE, RANGE = 1, 0, 2  # `go` modes
_FLAGS_UNKNOWN = frozenset({REGISTER_INDEX["eflags"]})
# What the plugin can write at a stop it holds, when that stop says so (runctl.c, GPR_NAMES).
GENERAL_REGISTERS = frozenset(
    ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{n}" for n in range(8, 16)))
)
CR3_BASE_MASK = 0x000F_FFFF_FFFF_E000  # the page-table base, as the debugger compares scopes


@dataclass(frozen=True, slots=True)
class PluginStop:
    cpu: int  # 1-based, as the gdbstub numbers threads
    kind: str  # "bp", "step", "watch", or "error" (a condition that could not be evaluated)
    pc: int
    registers: RegisterFile
    watch: tuple[BreakpointType, int] | None = None  # a watchpoint's type and address
    writable: bool = False  # the plugin can write this vCPU's GENERAL_REGISTERS at this stop


def parse_stop(line: str) -> PluginStop:
    """`stop VCPU KIND PC EXACT HEX` (vCPU 0-based; KIND `watch:TYPE:ADDR` for a watchpoint, PC
    then the instruction after the access; HEX: the registers PluginLink asked for, in QEMU's
    gdbstub order, as QEMU's `g` packet would carry them).
    EXACT bit 0 clear: the instruction is inside a translation block, where QEMU 10.0 has not
    written the lazily kept flags yet: eflags is reported unavailable rather than wrong. Bit 1
    set: the plugin can write the vCPU's general registers at this stop."""
    try:
        _, vcpu, kind, pc, exact, regs = line.split(" ", 5)
        registers = RegisterFile.from_qemu_g(bytes.fromhex(regs))
        bits = int(exact, 16)
        if not bits & 1:
            registers = RegisterFile(registers.data, registers.long_mode, _FLAGS_UNKNOWN)
        watch = None
        if kind.startswith("watch:"):
            kind, type, addr = kind.split(":")
            watch = (BreakpointType(int(type, 16)), int(addr, 16))
            if not watch[0].is_watchpoint:
                raise ValueError(f"not a watchpoint type: {type}")
        return PluginStop(int(vcpu, 16) + 1, kind, int(pc, 16), registers, watch, bool(bits & 2))
    except ValueError as exc:
        raise DriverError(f"malformed stop from vmigdb's QEMU plugin: {line[:120]!r}") from exc


class PluginLink:
    """The plugin's socket (QEMU connected to us). Blocking, line based; `fileno` for select."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self.on_flushed: Callable[[], None] = lambda: None  # the plugin said `flushed`
        self.hello = self._read_line(10.0)  # sent at the first vCPU's init
        if not self.hello.startswith("hello "):
            raise DriverError(f"vmigdb's QEMU plugin said {self.hello!r}")
        for regnum, register in enumerate(REGISTERS):  # for conditions' `reg` opcodes
            self.send(f"reg {regnum:x} {register.name}")
        self.send("want " + " ".join(name for name, _ in QEMU_REGISTERS))

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, line: str) -> None:
        try:
            self._sock.sendall(line.encode() + b"\n")
        except OSError as exc:
            raise MachineGone(f"vmigdb's QEMU plugin is gone ({exc})") from exc

    def set_breakpoint(
        self, addr: int, scope_cr3: int | None, conditions: tuple[bytes, ...]
    ) -> None:
        mask, cr3 = (CR3_BASE_MASK, scope_cr3 & CR3_BASE_MASK) if scope_cr3 is not None else (0, 0)
        codes = "".join(" " + code.hex() for code in conditions)
        self.send(f"bp {addr:x} {mask:x} {cr3:x}{codes}")

    def remove_breakpoint(self, addr: int) -> None:
        self.send(f"del {addr:x}")

    def set_watch(self, type: BreakpointType, addr: int, length: int) -> None:
        self.send(f"watch {int(type):x} {addr:x} {length:x}")

    def remove_watch(self, type: BreakpointType, addr: int, length: int) -> None:
        self.send(f"unwatch {int(type):x} {addr:x} {length:x}")

    def stopped(self) -> None:
        """QEMU's gdbstub stopped the machine: a step the plugin was taking ends there."""
        self.send("stopped")

    def set_register(self, name: str, value: int) -> None:
        """Write one of the held vCPU's GENERAL_REGISTERS (at a stop that said it can)."""
        self.send(f"setreg {name} {value:x}")

    def flush(self) -> None:
        """Guest memory changed under the held stop: QEMU drops its translated code at release."""
        self.send("flush")

    def go(self, cpu: int, mode: int, lo: int = 0, hi: int = 0) -> None:
        self.send(f"go {cpu - 1:x} {mode:x} {lo:x} {hi:x}")

    def poll(self) -> PluginStop | None:
        """A stop if one is waiting (never blocks)."""
        while True:
            if b"\n" not in self._buffer:
                self._sock.setblocking(False)
                try:
                    self._fill()
                except BlockingIOError:
                    pass
                finally:
                    self._sock.setblocking(True)
            if b"\n" not in self._buffer:
                return None
            stop = self._stop(self._take_line())
            if stop is not None:
                return stop

    def wait(self, timeout: float) -> PluginStop:
        while (stop := self._stop(self._read_line(timeout))) is None:
            pass
        return stop

    def _stop(self, line: str) -> PluginStop | None:
        if line == "flushed":
            self.on_flushed()
            return None
        if not line.startswith("stop "):
            raise DriverError(f"unexpected message from vmigdb's QEMU plugin: {line[:80]!r}")
        return parse_stop(line)

    def _fill(self) -> None:
        data = self._sock.recv(1 << 16)
        if not data:
            raise MachineGone("vmigdb's QEMU plugin closed its socket (QEMU exited?)")
        self._buffer += data

    def _take_line(self) -> str:
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    def _read_line(self, timeout: float) -> str:
        self._sock.settimeout(timeout)
        try:
            while b"\n" not in self._buffer:
                self._fill()
        except TimeoutError as exc:
            raise DriverError("vmigdb's QEMU plugin did not answer") from exc
        finally:
            self._sock.settimeout(None)
        return self._take_line()

    def close(self) -> None:
        self._sock.close()


class MonitorClient:
    """A blocking QMP client for the one call the driver makes while the plugin holds the
    machine (`info registers -a`). Hand-written: qemu.qmp's synchronous API runs its own asyncio
    loop, which cannot run inside vmigdb's, and the driver's calls are synchronous."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb", buffering=0)
        self._file.readline()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        try:
            self._file.write(json.dumps(request).encode() + b"\n")
            while True:
                line = self._file.readline()
                if not line:
                    raise MachineGone("QEMU closed its monitor socket")
                reply = json.loads(line)
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise DriverError(f"QEMU refused {command}: {reply['error'].get('desc')}")
        except (OSError, ValueError) as exc:
            raise DriverError(f"QEMU's monitor failed: {exc}") from exc

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def close(self) -> None:
        self._sock.close()


# `info registers -a`: "CPU#0" then "RAX=... RBX=...", segment lines "CS =0010 base limit flags".
_CPU = re.compile(r"^CPU#(\d+)", re.M)
_PAIR = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-fA-F]+)(?: ([0-9a-fA-F]{16}))?")
_GPRS = {
    n.upper(): n
    for n in ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip".split())
}
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_CONTROL = {"CR0": "cr0", "CR2": "cr2", "CR3": "cr3", "CR4": "cr4", "EFER": "efer", "RFL": "eflags",
            "MXCSR": "mxcsr"}  # fmt: skip


def parse_info_registers(text: str) -> dict[int, RegisterFile]:
    """Registers by 1-based vCPU from HMP `info registers -a` (x86-64). What it does not print
    (k_gs_base, the x87 and SSE registers) is marked unavailable."""
    text = text.replace("\r", "")
    found: dict[int, RegisterFile] = {}
    starts = [(int(m.group(1)), m.end()) for m in _CPU.finditer(text)]
    for i, (index, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(text)
        values: dict[str, int] = {}
        for key, value, base in _PAIR.findall(text[start:end]):
            name = key.lower()
            if key in _GPRS:
                values[_GPRS[key]] = int(value, 16)
            elif key in _CONTROL:
                values[_CONTROL[key]] = int(value, 16)
            elif name in _SEGMENTS:
                values[name] = int(value, 16)
                if name in ("fs", "gs") and base:
                    values[f"{name}_base"] = int(base, 16)
        if "rip" not in values:
            continue
        long_mode = bool(values.get("efer", 0) & (1 << 10))
        known = set(values)
        unavailable = [r.name for r in REGISTERS if r.name not in known]
        found[index + 1] = RegisterFile.from_values(values, long_mode, unavailable)
    return found
