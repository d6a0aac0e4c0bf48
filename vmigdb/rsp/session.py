"""One GDB conversation: protocol state and the mapping from packets to debugger calls. No I/O.

`Session.handle(payload)` takes one packet's payload and returns an `Outcome`: the reply payloads to
send, in order, and at most one `Action` the server must carry out (resume the machine and wait for a
stop, await a long monitor command's replies, detach, kill). Stop events come back through
`stop_reply()`.

Every packet is parsed and validated here, never passed through to the hypervisor. A malformed packet
gets `E16` (EINVAL) and the conversation goes on; an unknown one gets the empty reply. Every other
failure, from here or below, is turned into a reply in one place (`vmigdb.rsp.errors`), including
a resume the server carries out (`run`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from vmigdb.arch.x86_64.registers import (
    G_PACKET_SIZE,
    ORIG_RAX_REGNUM,
    REGISTER_INDEX,
    REGISTER_OFFSETS,
    REGISTER_SIZES,
    REGISTERS,
    RegisterFile,
    split_g,
)
from vmigdb.debugger.breakpoints import Condition, ConditionError
from vmigdb.debugger.catch_syscall import SyscallCatchError
from vmigdb.debugger.engine import Action as RunAction
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.events import StopEvent, StopReason
from vmigdb.debugger.guest_view import GuestUnavailable
from vmigdb.hv.base import BreakpointType, Unsupported
from vmigdb.rsp.agent import AgentError, AgentExpr, EvalContext, evaluate
from vmigdb.rsp.errors import ESRCH, PacketError, error_reply, text_reply
from vmigdb.rsp.features import PACKET_SIZE, Features
from vmigdb.rsp.monitor import Later, Monitor, MonitorError, SaveMachine
from vmigdb.rsp.parse import (
    addr_len,
    binary_data,
    breakpoint_args,
    hex_data,
    hex_number,
    legacy_resume_args,
    thread_id,
    v_cont_actions,
)
from vmigdb.rsp.procfs import GuestProcfs, region_info
from vmigdb.rsp.qemu_packets import QemuPackets
from vmigdb.rsp.target_xml import target_xml, xfer_slice
from vmigdb.rsp.vfile import VFileServer
from vmigdb.wire import codec

log = logging.getLogger("vmigdb.rsp")

MAX_MEMORY_READ = (PACKET_SIZE - 16) // 2

_EXPEDITED = (6, 7, 16)  # rbp, rsp, rip: what GDB needs first at every stop
_UNREAD = object()
WITH_MODULES = "+modules"  # vFile name suffix: the kernel's symbol ELF with every module's


_PC = REGISTER_INDEX["rip"]


def _unknown(regs: RegisterFile) -> frozenset[int]:
    """The registers GDB is told are unavailable: all whose value is unknown but the PC. GDB 13
    cannot stand an unavailable PC ("PC register is not available", and the target is dropped
    at connect), so an unknown rip is sent as its value in the file: 0."""
    return regs.unavailable - {_PC}


def registers_hex(regs: RegisterFile) -> bytes:
    """The `g` reply: every register in hex, `xx` for each byte of one whose value is unknown
    (GDB 13 then shows it as <unavailable>: remote.c, process_g_packet)."""
    text = codec.encode_hex(regs.to_g())
    unknown = _unknown(regs)
    if not unknown:
        return text
    out = bytearray(text)
    for regnum in unknown:
        start = 2 * REGISTER_OFFSETS[regnum]
        out[start : start + 2 * REGISTER_SIZES[regnum]] = b"x" * (2 * REGISTER_SIZES[regnum])
    return bytes(out)


def console_output(text: str) -> list[bytes]:
    """`O` packets carrying `text` to GDB's console, each kept small; GDB prints them as they come."""
    if not text:
        return []
    data = (text if text.endswith("\n") else text + "\n").encode()
    return [b"O" + codec.encode_hex(data[i : i + 0x4000]) for i in range(0, len(data), 0x4000)]


# -- actions the server carries out ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resume:
    actions: dict[int, RunAction]  # vCPU -> 'c' | 's' | RangeStep


@dataclass(frozen=True, slots=True)
class Await:
    """Await `replies` (a long monitor command, e.g. `monitor dump`), then send what it returns.
    The machine stays stopped; the server holds GDB's other packets until then, and sends
    `keepalive` every second meanwhile: GDB waits for a `qRcmd` answer as long as it takes, but
    says "Ignoring packet error, continuing..." after 3 silent timeouts (6 s by default)."""

    replies: Coroutine[Any, Any, list[bytes]]
    keepalive: bytes


@dataclass(frozen=True, slots=True)
class Detach:
    pass


@dataclass(frozen=True, slots=True)
class Kill:
    pass


Action = Resume | Await | Detach | Kill


@dataclass(slots=True)
class Outcome:
    replies: list[bytes] = field(default_factory=list)
    action: Action | None = None


Handler = Callable[[bytes], "Outcome | list[bytes] | bytes"]


def _condition(expr: AgentExpr) -> Condition:
    """A target-side condition for the debugger: GDB's bytecode, evaluated by vmigdb."""

    def holds(context: EvalContext) -> int:
        try:
            return evaluate(expr, context)
        except AgentError as exc:
            raise ConditionError(str(exc)) from exc

    holds.code = expr.code  # type: ignore[attr-defined]  # for a driver that decides it itself
    return holds


class Session:
    """Protocol state for one client. See the module docstring."""

    def __init__(
        self,
        debugger: Debugger,
        *,
        host_files: bool = True,
        save_machine: SaveMachine | None = None,
    ) -> None:
        self.debugger = debugger
        self.no_ack = False
        self._lldb = False  # the client said qHostInfo: LLDB (see `_kill`)
        self._g_thread = 0  # Hg: 0 = the thread of the last stop
        self._c_thread = -1  # Hc
        self._target_xml: bytes | None = None  # chosen at the first read (Linux guest or not)
        self._linux = False  # the Linux description (with orig_rax) was served
        self._xfer_cache: dict[bytes, bytes] = {}  # qXfer annex -> document, from offset 0 on
        # A stop reported as a library change first: the stop itself, for GDB's next resume.
        self._deferred: StopEvent | None = None
        # The scope (pid, None: the kernel) of the library list GDB last read; _UNREAD before.
        self._listed_scope: int | None | object = _UNREAD
        self._monitor = Monitor(
            debugger, self.current_cpu, host_files=host_files, save_machine=save_machine
        )
        self._procfs = GuestProcfs(debugger, self.current_cpu)
        self._vfile = VFileServer(self._guest_file)
        driver = debugger.driver
        self.features = Features.probe(driver.name, driver.capabilities)
        # (prefix, handler, the feature it needs): tried in this order, the first prefix wins.
        table: list[tuple[bytes, Handler, str | None]] = [
            (b"qSupported", lambda _: self.features.q_supported(), None),
            (b"QStartNoAckMode", self._start_no_ack, None),
            (b"qXfer:features:read:", self._q_xfer_features, None),
            (b"qXfer:threads:read::", self._q_xfer_threads, None),
            (b"qXfer:exec-file:read:", self._q_xfer_exec_file, None),
            (b"qXfer:libraries-svr4:read:", self._q_xfer_libraries, None),
            (b"QCatchSyscalls:", self._q_catch_syscalls, "catch_syscalls"),
            (b"vFile:", self._vfile.handle, None),
            (b"qfThreadInfo", self._q_thread_first, None),
            (b"qsThreadInfo", lambda _: b"l", None),
            (b"qThreadExtraInfo,", self._q_thread_extra, None),
            (b"qC", self._q_current, None),
            (b"qAttached", lambda _: b"1", None),
            (b"qSymbol:", lambda _: b"OK", None),
            (b"qRcmd,", self._q_rcmd, None),
            (b"vCont?", lambda _: self.features.v_cont(), None),
            (b"vCont;", self._v_cont, "run_control"),
            (b"vKill", self._kill, None),
            (b"vMustReplyEmpty", lambda _: b"", None),
            (b"qHostInfo", self._q_host_info, None),
            (b"qMemoryRegionInfo:", self._q_memory_region_info, None),
            *((prefix, handler, None) for prefix, handler in QemuPackets(debugger).entries()),
            (b"?", lambda _: self.stop_reply(self.debugger.last_stop), None),
            (b"g", self._read_registers, None),
            (b"G", self._write_registers, "register_write"),
            (b"p", self._read_register, None),
            (b"P", self._write_register, "register_write"),
            (b"m", self._read_memory, None),
            (b"M", self._write_memory_hex, "memory_write"),
            (b"X", self._write_memory_binary, "memory_write"),
            (b"Z", self._insert_breakpoint, None),  # per type, once parsed
            (b"z", self._remove_breakpoint, None),  # removing is always harmless
            (b"H", self._set_thread, None),
            (b"T", self._thread_alive, None),
            (b"c", self._continue, "run_control"),
            (b"C", lambda args: self._continue(args, with_signal=True), "run_control"),
            (b"s", self._step, "single_step"),
            (b"S", lambda args: self._step(args, with_signal=True), "single_step"),
            (b"D", self._detach, None),
            (b"k", self._kill, None),
        ]
        # A packet whose feature the driver lacks is not parsed: it gets the refusal at once.
        # Only the handlers that can match are tried: the per-packet path stays short.
        self._by_first_byte: dict[bytes, list[tuple[bytes, Handler]]] = {}
        for prefix, handler, feature in table:
            if feature is not None and not self.features.serves(feature):
                handler = self._refuse(feature)
            self._by_first_byte.setdefault(prefix[:1], []).append((prefix, handler))

    # -- entry points -----------------------------------------------------------------------------

    def handle(self, payload: bytes) -> Outcome:
        """Answer one packet."""
        for prefix, handler in self._by_first_byte.get(payload[:1], ()):
            if payload.startswith(prefix):
                try:
                    result = handler(payload[len(prefix) :])
                except Exception as exc:  # noqa: BLE001 - every failure becomes an RSP error reply
                    return Outcome([error_reply(exc, payload)])
                if isinstance(result, Outcome):
                    return result
                if isinstance(result, bytes):
                    return Outcome([result])
                return Outcome(list(result))
        return Outcome([b""])

    def run(self, resume: Resume) -> list[bytes]:
        """Start the machine as `resume` asks (the server calls this for a Resume outcome).

        Returns [] when it runs (the stop reply comes later, from `stop_replies`), else what GDB
        gets instead: an error reply, or a stop that was due before running (a snapshot loaded).
        """
        try:
            event = self.debugger.resume(resume.actions)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an RSP error reply
            return [error_reply(exc, b"resume %r" % sorted(resume.actions.items()))]
        return [] if event is None else self.stop_replies(event)

    def stop_replies(self, event: StopEvent) -> list[bytes]:
        """What GDB gets for a stop: the console message if any, then the stop reply.

        A stop that changed the library list (a caught exec, a module load, or any stop after
        the scope changed since GDB read the list) is told in two steps: first a library stop
        (``library:``), on which GDB reads the list again, loads the new symbols and resumes at
        once; that resume gets the stop itself, the guest having not run in between
        (`_resume`).
        """
        if (
            event.reason is not StopReason.EXITED
            and self._listed_scope is not _UNREAD
            and self._scope_pid() != self._listed_scope
        ):
            event = replace(event, libraries_changed=True)  # the scope changed since GDB read
        if event.libraries_changed and event.reason is not StopReason.EXITED:
            # the stop itself waits for GDB's resume; a library change alone has none
            self._deferred = (
                None if event.libraries_only else replace(event, libraries_changed=False)
            )
            self._g_thread = 0
            return [b"T05thread:%x;library:;" % (event.cpu or 1)]
        return [*console_output(event.message or ""), self.stop_reply(event)]

    def stop_reply(self, event: StopEvent | None) -> bytes:
        """The T/W/X packet for a stop."""
        if event is None:
            return b"S05"
        if event.reason is StopReason.EXITED:
            return b"W%02x" % ((event.exit_code or 0) & 0xFF)
        parts = [b"T%02xthread:%x;" % (event.signal & 0xFF, event.cpu)]
        if event.registers is not None:
            for regnum in _EXPEDITED:
                if regnum in _unknown(event.registers):
                    continue  # GDB reads it with `g` and is told it is unavailable
                parts.append(b"%x:%s;" % (regnum, codec.encode_hex(event.registers.raw(regnum))))
        if event.syscall is not None:
            key = b"syscall_entry" if event.syscall.phase == "entry" else b"syscall_return"
            parts.append(b"%s:%x;" % (key, event.syscall.number))
        if event.reason is StopReason.SW_BREAK:
            parts.append(b"swbreak:;")
        elif event.reason is StopReason.HW_BREAK:
            parts.append(b"hwbreak:;")
        elif event.reason is StopReason.WATCH and event.watch is not None:
            kind, addr = event.watch
            key = {BreakpointType.READ_WATCH: b"rwatch", BreakpointType.ACCESS_WATCH: b"awatch"}
            parts.append(b"%s:%x;" % (key.get(kind, b"watch"), addr))
        self._g_thread = 0
        return b"".join(parts)

    def _refuse(self, feature: str) -> Handler:
        reply = self.features.refusal(feature)
        return lambda _: reply

    # -- threads ----------------------------------------------------------------------------------

    def current_cpu(self) -> int:
        """The vCPU GDB's register and memory requests are about (Hg, else the last stop's)."""
        if self._g_thread > 0:
            return self._g_thread
        stop = self.debugger.last_stop
        if stop is not None and stop.cpu is not None:
            return stop.cpu
        return self.debugger.cpus()[0]

    def _set_thread(self, args: bytes) -> bytes:
        which, tid = args[:1], thread_id(args[1:])
        if tid > 0 and tid not in self.debugger.cpus():
            return ESRCH
        if which == b"g":
            if tid < 0:
                raise PacketError("Hg-1 names no single thread")
            self._g_thread = tid
        elif which == b"c":
            self._c_thread = tid
        else:
            raise PacketError(f"unknown H{which!r}")
        return b"OK"

    def _thread_alive(self, args: bytes) -> bytes:
        return b"OK" if thread_id(args) in self.debugger.cpus() else ESRCH

    def _q_thread_first(self, _: bytes) -> bytes:
        return b"m" + b",".join(b"%x" % cpu for cpu in self.debugger.cpus())

    def _q_thread_extra(self, args: bytes) -> bytes:
        cpu = thread_id(args)
        if cpu not in self.debugger.cpus():
            return ESRCH
        return codec.encode_hex(f"CPU#{cpu - 1}".encode())

    def _q_current(self, args: bytes) -> bytes:
        if args:
            return b""  # qCRC and friends: unsupported, so GDB falls back to reading memory
        return b"QC%x" % self.current_cpu()

    def _q_xfer_threads(self, args: bytes) -> bytes:
        offset, length = addr_len(args)
        body = "".join(
            f'<thread id="{cpu:x}" core="{cpu - 1}" name="CPU#{cpu - 1}"/>'
            for cpu in self.debugger.cpus()
        )
        document = f'<?xml version="1.0"?>\n<threads>{body}</threads>'.encode()
        return codec.escape_binary(xfer_slice(document, offset, length))

    # -- features ---------------------------------------------------------------------------------

    def _q_xfer_exec_file(self, args: bytes) -> bytes:
        """The guest kernel's symbol file, by a name only vFile knows (GDB then fetches it)."""
        annex, sep, span = args.partition(b":")
        if not sep:
            raise PacketError("expected ANNEX:OFFSET,LENGTH")
        offset, length = addr_len(span)
        try:
            name = self.debugger.guest.os().exec_file_name
        except GuestUnavailable:
            return b"E01"
        return codec.escape_binary(xfer_slice(name.encode(), offset, length))

    def _guest_file(self, path: str) -> bytes | None:
        """What vFile may open: when the guest is understood, the kernel's symbol ELF (GDB's
        executable), a library listed by `_q_xfer_libraries`, and, for `vmigdb symbols --from`,
        the kernel's with every module's symbols; and the /proc files debugger plugins read
        (`vmigdb.rsp.procfs`)."""
        try:
            guest_os = self.debugger.guest.os()
        except GuestUnavailable:
            guest_os = None
        if guest_os is not None:
            if path == guest_os.exec_file_name:
                return guest_os.exec_elf
            if path == guest_os.exec_file_name + WITH_MODULES:
                return guest_os.symbol_elf
            library = self.debugger.libraries.file(path)
            if library is not None:
                return library
        return self._procfs.contents(path)

    def _q_xfer_libraries(self, args: bytes) -> bytes:
        """GDB's shared-library list: the scoped process's objects, or the kernel's modules."""
        annex, sep, span = args.partition(b":")
        if not sep or annex:
            raise PacketError("expected :OFFSET,LENGTH")
        offset, length = addr_len(span)
        key = b"libraries-svr4"
        if offset == 0 or key not in self._xfer_cache:
            self._xfer_cache[key] = self.debugger.libraries.svr4_xml()
            self._listed_scope = self._scope_pid()
        return codec.escape_binary(xfer_slice(self._xfer_cache[key], offset, length))

    def _scope_pid(self) -> int | None:
        scope = self.debugger.scope
        return scope.pid if scope is not None else None

    def _q_catch_syscalls(self, args: bytes) -> bytes:
        """``QCatchSyscalls:1[;NR]...`` (catch these, or all) or ``QCatchSyscalls:0``."""
        flag, _, rest = args.partition(b";")
        if flag not in (b"0", b"1") or (flag == b"0" and rest):
            raise PacketError("expected 0, or 1 and system-call numbers")
        numbers = frozenset(hex_number(n) for n in rest.split(b";")) if rest else None
        try:
            self.debugger.catch_syscalls(flag == b"1", numbers)
        except SyscallCatchError as exc:
            return text_reply(str(exc))
        return b"OK"

    def _start_no_ack(self, _: bytes) -> bytes:
        self.no_ack = True
        return b"OK"

    def _q_xfer_features(self, args: bytes) -> bytes:
        annex, sep, span = args.partition(b":")
        if not sep:
            raise PacketError("expected ANNEX:OFFSET,LENGTH")
        offset, length = addr_len(span)
        if annex != b"target.xml":
            return b"E00"
        if self._target_xml is None:
            self._linux = self._guest_is_linux()
            self._target_xml = target_xml(self._linux).encode()
        return codec.escape_binary(xfer_slice(self._target_xml, offset, length))

    def _guest_is_linux(self) -> bool:
        """Describe the target as GNU/Linux (GDB's system-call names and SVR4 libraries) when
        the guest is an analysable Linux."""
        try:
            return self.debugger.guest.os().kind == "Linux"
        except GuestUnavailable:
            return False

    def _q_rcmd(self, args: bytes) -> Outcome | list[bytes]:
        command = hex_data(args).decode("utf-8", "replace")
        try:
            answer = self._monitor.run(command)
        except (MonitorError, Unsupported) as exc:
            # GDB decodes any qRcmd reply as hex: a refusal's text goes to its console instead.
            return [*console_output(str(exc)), b"E01"]
        if isinstance(answer, Later):
            # The note, then a dot a second (GDB prints them as they come), then the answer.
            note = b"O" + codec.encode_hex(answer.note.encode())
            return Outcome([note], Await(self._later(command, answer), b"O2e"))
        return [*console_output(answer), b"OK"]

    async def _later(self, command: str, answer: Later) -> list[bytes]:
        try:
            text = await answer.work
        except MonitorError as exc:
            return [*console_output(f"\n{exc}"), b"E01"]
        except Exception as exc:  # noqa: BLE001 - every failure becomes an RSP error reply
            return [*console_output("\n"), error_reply(exc, b"qRcmd " + command.encode()[:48])]
        return [*console_output(f"\n{text}"), b"OK"]

    # -- registers --------------------------------------------------------------------------------

    def _read_registers(self, args: bytes) -> bytes:
        if args:
            raise PacketError("g takes no argument")
        return registers_hex(self.debugger.registers(self.current_cpu()))

    def _write_registers(self, args: bytes) -> bytes:
        data = hex_data(args)
        if len(data) != G_PACKET_SIZE:
            raise PacketError(f"G needs {G_PACKET_SIZE} bytes, got {len(data)}")
        cpu = self.current_cpu()
        current = self.debugger.registers(cpu)
        changes = {
            regnum: value
            for regnum, value in enumerate(split_g(data))
            if value != current.raw(regnum)
        }
        if changes:
            self.debugger.write_registers(cpu, changes)
        return b"OK"

    def _regnum(self, text: bytes) -> int:
        regnum = hex_number(text)
        if regnum >= len(REGISTERS) and not (self._linux and regnum == ORIG_RAX_REGNUM):
            raise PacketError(f"no register {regnum}")
        return regnum

    def _read_register(self, args: bytes) -> bytes:
        regnum = self._regnum(args)
        cpu = self.current_cpu()
        if regnum == ORIG_RAX_REGNUM:
            value = self.debugger.orig_rax(cpu) & ((1 << 64) - 1)
            return codec.encode_hex(value.to_bytes(8, "little"))
        regs = self.debugger.registers(cpu)
        if regnum in _unknown(regs):
            return b"xx" * REGISTER_SIZES[regnum]  # GDB: <unavailable>
        return codec.encode_hex(regs.raw(regnum))

    def _write_register(self, args: bytes) -> bytes:
        num, sep, value = args.partition(b"=")
        if not sep:
            raise PacketError("expected N=VALUE")
        regnum = self._regnum(num)
        raw = hex_data(value)
        if regnum == ORIG_RAX_REGNUM:
            if len(raw) != 8:
                raise PacketError("orig_rax takes 8 bytes")
            self.debugger.write_orig_rax(
                self.current_cpu(), int.from_bytes(raw, "little", signed=True)
            )
            return b"OK"
        if len(raw) * 8 != REGISTERS[regnum].bitsize:
            raise PacketError(f"register {regnum} takes {REGISTERS[regnum].bitsize // 8} bytes")
        self.debugger.write_register(self.current_cpu(), regnum, raw)
        return b"OK"

    # -- memory -----------------------------------------------------------------------------------

    def _read_memory(self, args: bytes) -> bytes:
        addr, length = addr_len(args)
        # A read that runs past the top of the address space is legitimate (GDB sends one when an
        # unwinder probes near -1): it gets the bytes up to the top, a short read GDB accepts.
        length = min(length, MAX_MEMORY_READ, (1 << 64) - addr)
        if length == 0:
            return b""
        return codec.encode_hex(self.debugger.read_memory(self.current_cpu(), addr, length))

    def _write_memory(self, addr: int, length: int, data: bytes) -> bytes:
        if len(data) != length:
            raise PacketError(f"length {length} but {len(data)} bytes of data")
        if addr + length > 1 << 64:
            raise PacketError("range wraps")
        if length:
            self.debugger.write_memory(self.current_cpu(), addr, data)
        return b"OK"

    def _write_memory_hex(self, args: bytes) -> bytes:
        head, sep, body = args.partition(b":")
        if not sep:
            raise PacketError("expected ADDR,LENGTH:DATA")
        return self._write_memory(*addr_len(head), hex_data(body))

    def _write_memory_binary(self, args: bytes) -> bytes:
        head, sep, body = args.partition(b":")
        if not sep:
            raise PacketError("expected ADDR,LENGTH:DATA")
        return self._write_memory(*addr_len(head), binary_data(body))

    # -- breakpoints ------------------------------------------------------------------------------

    def _insert_breakpoint(self, args: bytes) -> bytes:
        type, addr, length, exprs = breakpoint_args(args)
        feature = self.features.breakpoint_feature(type)
        if not self.features.serves(feature):
            return self.features.refusal(feature)
        self.debugger.add_breakpoint(type, addr, length, tuple(_condition(e) for e in exprs))
        return b"OK"

    def _remove_breakpoint(self, args: bytes) -> bytes:
        type, addr, length, exprs = breakpoint_args(args)
        if exprs:
            raise PacketError("z takes no conditions")
        self.debugger.remove_breakpoint(type, addr, length)
        return b"OK"

    # -- run control ------------------------------------------------------------------------------

    def _resume(self, actions: dict[int, RunAction]) -> Outcome:
        """Run as asked, unless a stop is waiting to be told (see `stop_replies`): then that stop
        is the answer, and the guest does not run."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            return Outcome(self.stop_replies(deferred))
        return Outcome(action=Resume(actions))

    def _v_cont(self, args: bytes) -> Outcome:
        runnable = v_cont_actions(args, self.debugger.cpus())
        if not self.features.single_step and any(a != "c" for a in runnable.values()):
            return Outcome([self.features.refusal("single_step")])
        return self._resume(runnable)

    def _resume_thread(self) -> int:
        return self._c_thread if self._c_thread > 0 else self.current_cpu()

    def _continue(self, args: bytes, *, with_signal: bool = False) -> Outcome:
        legacy_resume_args(args, with_signal)
        if self._c_thread > 0:
            return self._resume({self._c_thread: "c"})
        return self._resume({cpu: "c" for cpu in self.debugger.cpus()})

    def _step(self, args: bytes, *, with_signal: bool = False) -> Outcome:
        legacy_resume_args(args, with_signal)
        return self._resume({self._resume_thread(): "s"})

    def _detach(self, args: bytes) -> Outcome:
        if args and not args.startswith(b";"):
            raise PacketError("bad D packet")
        return Outcome([b"OK"], action=Detach())

    def _kill(self, _: bytes) -> Outcome:
        """GDB's `kill` powers the guest off. LLDB 16 sends the same `k` when it quits after
        `gdb-remote` (it only detaches from processes it attached to itself), so an LLDB
        client's `k` detaches: quitting LLDB never takes the VM down."""
        if self._lldb:
            log.info("LLDB sent k (it does on quit): detaching; the guest keeps running")
            return Outcome([b"OK"], action=Detach())
        return Outcome([b"OK"], action=Kill())

    def _q_memory_region_info(self, args: bytes) -> bytes:
        """LLDB's `memory region`: the mapped run (or the gap) holding an address."""
        mode, pages = self.debugger.mappings(self.current_cpu())
        return region_info(mode, pages, hex_number(args))

    def _q_host_info(self, _: bytes) -> bytes:
        """Only LLDB asks this. Unanswered, LLDB takes the registers from target.xml."""
        self._lldb = True
        return b""
