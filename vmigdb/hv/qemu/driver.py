"""The QEMU driver: guest RAM from the shared memory backend, run control through QEMU's gdbstub.

Reads of guest-physical memory come straight from the mmap of the RAM backend file (no round trip).
Writes, registers, breakpoints and steps go through QEMU's gdbstub, so QEMU keeps its translated code
coherent. vmigdb composes every packet it sends there (see gdbstub.py for why).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import selectors
import time

from vmigdb.arch.x86_64.paging import (
    PagingMode,
    PhysicalMemoryError,
    Translation,
    cr3_tables,
    paging_mode,
    translate,
)
from vmigdb.arch.x86_64.registers import REGISTERS, RegisterFile
from vmigdb.hv.base import (
    BreakpointType,
    Capabilities,
    Driver,
    DriverError,
    DriverStop,
    MachineGone,
    Mechanism,
    NotNow,
)
from vmigdb.hv.qemu.bp_pages import PAGE, PageMarkers, marker_in
from vmigdb.hv.qemu.channel import QemuChannel, ResumeRefused
from vmigdb.hv.qemu.memory import PhysicalMemory
from vmigdb.hv.qemu.process import TIME_MODES
from vmigdb.hv.qemu.runctl import (
    CONTINUE,
    GENERAL_REGISTERS,
    STEP,
    MonitorClient,
    PluginLink,
    PluginStop,
    parse_info_registers,
)
from vmigdb.hv.qemu.turns import TurnView, give_turn_back
from vmigdb.hv.qemu.version import known_defects, version_text
from vmigdb.wire.awake import AwakeSelector
from vmigdb.wire.codec import decode_hex, encode_hex

log = logging.getLogger("vmigdb.hv.qemu")

# QEMU's gdbstub caps packets at 0x1000 bytes; an M packet carries hex, so stay well under half.
_WRITE_CHUNK = 1024
_STOP_RE = re.compile(rb"^[TS]([0-9a-fA-F]{2})(.*)$", re.DOTALL)
_WATCH_KEYS = {
    b"watch": BreakpointType.WRITE_WATCH,
    b"rwatch": BreakpointType.READ_WATCH,
    b"awatch": BreakpointType.ACCESS_WATCH,
}


PATCHED_INT3 = "kvm-patched-int3"

# QEMU's single-step flags (gdbstub's Qqemu.sstep; QEMU's default is 0x7: ENABLE, NOIRQ, NOTIMER)
# for a step from HLT under instruction-counted time with several vCPUs. icount runs every vCPU on
# one thread in turn, and that loop turns the VM clock off while the vCPU it is on steps with
# NOTIMER set, and leaves it so when every vCPU sleeps: nothing then advances icount's clock to
# the next timer, and a vCPU stepped while it sleeps in HLT never wakes (measured, QEMU 10.0.2, an
# idle 2-vCPU guest: 7 of 8 stepi from native_safe_halt still waiting after 20 s; 0 of 8 with
# 0x3). Without NOTIMER the guest's timers fire when due and wake it; interrupts stay masked on
# the stepping vCPU (NOIRQ), so the step still executes exactly one instruction. Only such steps
# get 0x3: with timers on, icount's idle-time warp also ran during every step, and one RDTSC
# sample in a session of 20 hits and 20 steps through antidebug's timed blocks came out 904x its
# median (0 with 0x7).
ICOUNT_SMP_SSTEP = 0x3
QEMU_DEFAULT_SSTEP = 0x7
_HLT = b"\xf4"
SIGINT = 2  # GDB's signal for a stop a ^C asked for

# Whether every vCPU came up is told from what the guest did, not assumed from the vCPU count: a
# vCPU the kernel never started runs with paging off (CR0.PG clear) while the one that booted has
# it on. Not CR0.PE: SeaBIOS leaves the vCPUs it does not boot from halted in 32-bit protected
# mode (measured: a 2-vCPU guest booted with maxcpus=1 kept CPU#1 at 0xfd0cf, CR0.PE set, paging
# off). Linux starts its other vCPUs about a second into the kernel (the demo's 2-vCPU guest under
# icount: paging on in both by its "ready" line, ~20 s after QEMU started). After this much time
# running under vmigdb, a vCPU still without paging is one the guest failed to start (or was told
# not to: nosmp, maxcpus=1).
BRING_UP_GRACE_S = 60.0
_CR0_PG = 1 << 31

KERNEL_HALF = 1 << 63  # addresses from here on are the kernel's, mapped in every address space


def unpaged_vcpus(cr0s: dict[int, int]) -> list[int]:
    """The vCPUs (1-based, as keyed) with paging off while another runs with it on: none while
    no vCPU has paging on (the kernel has not started yet)."""
    if not any(cr0 & _CR0_PG for cr0 in cr0s.values()):
        return []
    return sorted(cpu for cpu, cr0 in cr0s.items() if not cr0 & _CR0_PG)


def bring_up_report(
    cr0s: dict[int, int], ran_s: float, time_mode: str
) -> tuple[str | None, str | None]:
    """(what `monitor info`'s vcpus line adds, a warning or None) for vCPUs' CR0 values after
    `ran_s` host seconds of running under vmigdb in `time_mode`."""
    stuck = unpaged_vcpus(cr0s)
    if not stuck:
        return None, None
    names = ", ".join(f"CPU#{cpu - 1}" for cpu in stuck)
    if ran_s < BRING_UP_GRACE_S:
        return f"{names} with paging off (CR0.PG clear): not brought up yet", None
    note = f"{names} never turned paging on (CR0.PG clear): the guest did not bring it up"
    if time_mode != "icount":
        return note, None
    return note, (
        f"{names} still with paging off (CR0.PG clear) after {ran_s:.0f} s of running, while the "
        "guest runs on the others: it did not bring it up. Under instruction-counted time (icount) "
        "some kernels hang starting a second vCPU (Debian's 6.1 on QEMU 7.2): if the guest is "
        "stuck, restart with --time host (or --smp 1); ignore this if it was booted with nosmp "
        "or maxcpus"
    )


def _m(key: str, description: str, visible: bool, why: str, limit: int | None = None) -> Mechanism:
    return Mechanism(key, description, visible, limit, why)


_SHARED = dict(
    run_control=True,
    register_write=True,
    registers=_m(
        "qemu-vcpu-state",
        "vCPU state read through QEMU's gdbstub",
        False,
        "reads QEMU's copy of the vCPU state; nothing runs in the guest",
    ),
    memory_read=_m(
        "shared-ram",
        "direct reads of guest RAM (memory-backend-file, share=on) + vmigdb's page walk",
        False,
        "no guest code runs and no page is touched or mapped in the guest",
    ),
    memory_write=_m(
        "qemu-physical-write",
        "guest-physical writes through QEMU (keeps translated code coherent)",
        True,
        "the guest sees the bytes you write, as asked; nothing else changes",
    ),
)


# What guest time shows of the debugger, per `vmigdb qemu --time` mode (hv/qemu/process.py).
# In both, QEMU stops every guest clock with the VM (TSC, clocksources, RTC with -rtc clock=vm).
_TCG_TIME = {
    "icount": _m(
        "tcg-icount-time",
        f"instruction-counted guest time ({' '.join(TIME_MODES['icount'])})",
        False,
        "clocks stop while the VM is stopped; retranslation after breakpoint changes and steps "
        "retires no guest instruction, so RDTSC cannot time it; clocks track host time within "
        "10%, idle and busy",
    ),
    "host": _m(
        "tcg-host-time",
        "host-paced guest time (--time host)",
        True,
        "clocks stop while the VM is stopped, but QEMU retranslates guest code after every "
        "breakpoint change and step, which RDTSC-timed guest code sees as 100-1000x slow; "
        "--time icount (TCG; with several vCPUs, QEMU 10) hides it",
    ),
}


PLUGIN_MECHANISM = _m(
    "tcg-plugin-run-control",
    "vmigdb's TCG plugin: breakpoint scope and conditions decided in QEMU at guest speed; a true "
    "hit or a step's end holds the vCPU (icount's one thread: the whole machine) before the "
    "instruction; watchpoints too; at its stops it writes the held vCPU's general registers "
    "into QEMU's state of it; other breakpoints, other writes and ^C stay QEMU's gdbstub's",
    False,
    "runs inside QEMU's translated code, never in the guest; a false hit costs a callback, not a "
    "VM stop; under icount no guest instruction retires while it holds the machine",
)


# Between the ^C that stops the machine to set page markers and the release of the vCPU the
# plugin holds: QEMU reads the ^C at once (its vm_stop then waits for the held vCPU).
MARK_STOP_GRACE_S = 0.02
REWRITE_CHUNK = 1024  # bytes per gdbstub `M` when a page is rewritten to retranslate it

# Under icount QEMU's own watchpoints can abort QEMU with several vCPUs (plugin/runctl.c says how).
PLUGIN_WATCHPOINT = _m(
    "tcg-plugin-watchpoint",
    "vmigdb's TCG plugin: a memory callback on every instruction while a watchpoint exists; the "
    "stop is held at the next instruction, as x86 reports data breakpoints",
    False,
    "runs inside QEMU's translated code; no debug register is used; the guest runs slower while "
    "a watchpoint exists, which icount's instruction-counted time does not show",
)


def tcg_capabilities(time_mode: str, step_timers: bool = False) -> Capabilities:
    """Under TCG every run-control mechanism lives in QEMU's translator: none touches the guest.
    Only guest time can tell, depending on `time_mode` ("host" or "icount"). `step_timers`: QEMU
    steps from HLT with the guest's timers running (ICOUNT_SMP_SSTEP)."""
    bp = _m(
        "tcg-breakpoint",
        "TCG translator breakpoint",
        False,
        "checked when QEMU translates code; no byte of guest memory changes",
    )
    return Capabilities(
        sw_breakpoint=bp,
        hw_breakpoint=bp,
        watchpoint=_m(
            "tcg-watchpoint",
            "TCG soft-MMU watchpoint",
            False,
            "QEMU traps the access in its own TLB; no debug register is used",
        ),
        single_step=_m(
            "tcg-single-step",
            "TCG translator single-step (interrupts and timers masked while stepping"
            + ("; timers run for a step from hlt: icount with several vCPUs)" if step_timers else ")"),
            False,
            "QEMU translates one instruction at a time; no TF in the guest's RFLAGS",
        ),
        guest_time=_TCG_TIME[time_mode],
        **_SHARED,
    )


def kvm_capabilities() -> Capabilities:
    """Under KVM QEMU patches 0xCC for software breakpoints and steps with TF: avoid both."""
    slots = _m(
        "kvm-debug-registers",
        "hardware debug registers held by the hypervisor",
        False,
        "KVM loads DR0-3 for the debugger and hides them from the guest",
        limit=4,
    )
    return Capabilities(
        sw_breakpoint=slots,
        hw_breakpoint=slots,
        watchpoint=slots,
        single_step=_m(
            "kvm-trap-flag",
            "single-step with RFLAGS.TF set by KVM",
            True,
            "the guest can observe TF (pushf) while a step is in flight",
        ),
        sw_breakpoint_fallback=_m(
            PATCHED_INT3,
            "0xCC written into guest RAM by QEMU (KVM software breakpoint)",
            True,
            "the guest reading its own code sees 0xCC; a checksum of its code catches it",
        ),
        # Declared, not gated (guest_time stays None): every stop shows in the TSC, whatever the
        # mechanism that made it, so there is no invisible alternative for the policy to prefer.
        extra=(
            _m(
                "kvm-tsc",
                "the guest's TSC while the VM is stopped",
                True,
                "under KVM the TSC keeps counting while vmigdb holds the VM stopped",
            ),
        ),
        **_SHARED,
    )


def parse_stop(packet: bytes) -> DriverStop | None:
    """Turn a stop reply from QEMU into a DriverStop; None for packets that are not stop replies."""
    if packet[:1] in (b"W", b"X"):
        try:
            code = int(packet[1:3], 16)
        except ValueError:
            code = 0
        return DriverStop(cpu=None, signal=code if packet[:1] == b"X" else 0, exited=code)
    match = _STOP_RE.match(packet)
    if not match:
        return None
    signal = int(match.group(1), 16)
    cpu = None
    watch = None
    for field in match.group(2).split(b";"):
        key, _, value = field.partition(b":")
        try:
            if key == b"thread":
                cpu = int(value.split(b".")[-1], 16)
            elif key in _WATCH_KEYS:
                watch = (_WATCH_KEYS[key], int(value, 16))
        except ValueError:
            log.warning("ignoring a malformed field in QEMU's stop reply: %r", field)
    return DriverStop(cpu=cpu, signal=signal, watch=watch)


class QemuDriver(Driver):
    """Drives one QEMU process. Build it with `vmigdb.hv.qemu.launch.launch_qemu`."""

    name = "qemu"

    def __init__(
        self,
        channel: QemuChannel,
        memory: PhysicalMemory,
        accel: str,
        time_mode: str,
        time_reason: str = "as asked",
    ) -> None:
        self._channel = channel
        self._memory = memory
        self.accel = accel
        self.time_mode = time_mode
        self.time_reason = time_reason  # e.g. "auto: TCG with 1 vCPU"
        self._ran = 0.0  # host seconds the VM has run under this driver (ended runs)
        self._run_started: float | None = None  # when the current run began, while it runs
        if accel == "kvm":
            self.capabilities = kvm_capabilities()
        else:
            self.capabilities = tcg_capabilities(time_mode)
        self._g_cpu: int | None = None  # the vCPU QEMU's Hg currently points at
        self._cpus: list[int] = []
        self._patched: set[tuple[int, int]] = set()  # KVM Z0s QEMU serves by patching 0xCC
        self._held: set[tuple[int, int, int]] = set()  # (type, addr, length) QEMU holds for us
        self.notes: list[tuple[str, str]] = []  # more `monitor info` lines (an attached VM's)
        self.exit_status: int | None = None
        # What the last resume asked of each vCPU, and the vCPUs on which QEMU may still have its
        # single-step armed: QEMU 7.2 disarms only the vCPU its stop reply names
        # (gdb_vm_state_change), so a vCPU stepped alongside another that stopped first keeps it,
        # and would stop after one instruction of its next `continue`.
        self._driven: dict[int, str] = {}
        self._resume_packet = b""
        self._armed: set[int] = set()
        self.leftover_steps = 0  # stops of that kind absorbed (monitor info shows them)
        self._interrupting = False  # an interrupt was asked: the next stop is reported as it is
        self.qemu_version: tuple[int, int, int] | None = None  # set by whoever started QEMU
        self._icount_smp = False  # icount with several vCPUs: steps from HLT need timers
        self._sstep = QEMU_DEFAULT_SSTEP  # QEMU's single-step flags as vmigdb last set them
        # vmigdb's run-control plugin (runctl.py), when QEMU runs it: conditional and scoped
        # breakpoints, and steps from the stops it holds, are decided inside QEMU.
        self._plugin: PluginLink | None = None
        self._monitor: MonitorClient | None = None
        self._plugin_bps: set[int] = set()  # addresses the plugin serves
        self._markers = PageMarkers()  # one-instruction blocks on their pages (bp_pages.py)
        self._unmarked: dict[int, int | None] = {}  # plugin breakpoints set while it held: scope
        self._plugin_watches: set[tuple[BreakpointType, int, int]] = set()  # (type, addr, length)
        # A first watchpoint set at a stop QEMU's gdbstub holds: QEMU translates one instruction
        # per block until the plugin has flushed the code translated without memory callbacks.
        self._watch_flush_pending = False
        self._plugin_stepping = False
        self._plugin_held: PluginStop | None = None  # the stop the plugin holds, if any
        self._others: dict[int, RegisterFile] | None = None  # other vCPUs at that stop
        self._deferred: list[tuple[int, int, int]] = []  # gdbstub removals owed (plugin-held)
        self._owed_markers: dict[int, int] = {}  # page -> its marker, among those removals
        self._selector: selectors.DefaultSelector | None = None
        self._one_insn = False  # QEMU's one-insn-per-tb, on while the plugin steps
        self.plugin_note = ""  # `monitor info`: what serves run control, and why
        # Breakpoints without conditions or scope: the plugin's (fast steps from their stops) or
        # QEMU's gdbstub's (the default: register writes and snapshots possible at their stops);
        # `monitor plugin-breakpoints on|off`.
        self.plugin_breakpoints = False

    # -- set-up -----------------------------------------------------------------------------------

    def attach(self) -> DriverStop:
        """Take over QEMU's gdbstub right after connecting (QEMU pauses the VM on connect)."""
        stop = self._note(parse_stop(self._channel.attach()) or DriverStop(cpu=None, signal=2))
        features = self._channel.request(b"qSupported:swbreak+;hwbreak+;vContSupported+")
        log.debug("QEMU gdbstub features: %s", features)
        # GDB's address in M packets is physical from now on: vmigdb translates virtual addresses itself.
        if self._channel.request(b"Qqemu.PhyMemMode:1") != b"OK":
            raise DriverError("QEMU's gdbstub refused physical memory mode (Qqemu.PhyMemMode)")
        self._read_target_xml()
        self._cpus = self._thread_list()
        self._icount_smp = self.time_mode == "icount" and len(self._cpus) > 1
        if self._icount_smp:
            self.capabilities = tcg_capabilities(self.time_mode, step_timers=True)
        return stop

    def attach_plugin(self, link: PluginLink, monitor: MonitorClient) -> None:
        """Use vmigdb's QEMU plugin for conditional and scoped breakpoints and for the steps
        from the stops it holds (`monitor` answers `info registers` while it holds one)."""
        self._plugin, self._monitor = link, monitor
        self.decides_conditions = True
        self._selector = AwakeSelector()  # a blocking wait_stop answers as fast as the loop
        self._selector.register(self._channel.fileno(), selectors.EVENT_READ)
        self._selector.register(link.fileno(), selectors.EVENT_READ)
        link.on_flushed = self._on_watch_flushed
        self.capabilities = dataclasses.replace(
            self.capabilities,
            watchpoint=PLUGIN_WATCHPOINT,
            extra=(*self.capabilities.extra, PLUGIN_MECHANISM),
        )

    @property
    def has_plugin(self) -> bool:
        return self._plugin is not None

    @property
    def plugin_holds(self) -> bool:
        """Is this stop held inside QEMU by the plugin (QEMU cannot stop the VM meanwhile)?"""
        return self._plugin_held is not None

    def in_hlt(self, cpu: int) -> bool:
        """Whether the vCPU sleeps in HLT: QEMU shows a halted vCPU's RIP just past its hlt."""
        return self.halted(self.read_registers(cpu))

    def halted(self, regs: RegisterFile) -> bool:
        """`in_hlt` for registers already read."""
        if regs["rip"] == 0:
            return False
        mode = paging_mode(regs["cr0"], regs["cr4"], regs["efer"])
        try:
            where = translate(self._memory.read, regs["cr3"], regs["rip"] - 1, mode)
            return isinstance(where, Translation) and self._memory.read(where.pa, 1) == _HLT
        except PhysicalMemoryError:
            return False

    def _set_step_flags(self, steppers: list[int]) -> None:
        """icount with several vCPUs: QEMU's timers run during a step from HLT, and only then
        (see ICOUNT_SMP_SSTEP)."""
        want = QEMU_DEFAULT_SSTEP
        if any(self.in_hlt(cpu) for cpu in steppers):
            want = ICOUNT_SMP_SSTEP
        if want == self._sstep:
            return
        reply = self._channel.request(b"Qqemu.sstep=%x" % want)
        if reply == b"OK":
            self._sstep = want
        else:
            log.warning("QEMU refused single-step flags %#x: %r", want, reply)

    def _read_target_xml(self) -> None:
        """QEMU serves `P` register writes only to a client that has read its target description
        (gdbstub.c, handle_set_reg: `if (!gdb_has_xml) put_packet("")`): read it once."""
        offset = 0
        while offset < 1 << 20:
            reply = self._channel.request(b"qXfer:features:read:target.xml:%x,ffb" % offset)
            if reply[:1] not in (b"m", b"l"):
                raise DriverError(f"QEMU did not serve its target description: {reply[:40]!r}")
            offset += len(reply) - 1
            if reply[:1] == b"l":
                return

    def _thread_list(self) -> list[int]:
        cpus: list[int] = []
        reply = self._channel.request(b"qfThreadInfo")
        while reply.startswith(b"m"):
            cpus += [int(t.split(b".")[-1], 16) for t in reply[1:].split(b",") if t]
            reply = self._channel.request(b"qsThreadInfo")
        if not cpus:
            raise DriverError(f"QEMU listed no vCPUs: {reply!r}")
        return cpus

    # -- stopped-state verbs ----------------------------------------------------------------------

    def cpus(self) -> list[int]:
        return list(self._cpus)

    def read_physical(self, pa: int, length: int) -> bytes:
        return self._memory.read(pa, length)

    def physical_ranges(self) -> list[tuple[int, int]]:
        return self._memory.ranges()

    def write_physical(self, pa: int, data: bytes) -> None:
        if self._plugin_held is not None and getattr(self._memory, "writable", False):
            # QEMU's gdbstub cannot be reached: store into the RAM file, and have the plugin
            # flush QEMU's translated code before the guest runs on (the store may be code).
            assert self._plugin is not None
            self._memory.write(pa, data)
            self._plugin.flush()
            return
        self._refuse_while_held("writing guest memory")
        for offset in range(0, len(data), _WRITE_CHUNK):
            chunk = data[offset : offset + _WRITE_CHUNK]
            reply = self._channel.request(
                b"M%x,%x:" % (pa + offset, len(chunk)) + encode_hex(chunk)
            )
            if reply != b"OK":
                raise DriverError(f"QEMU refused a write at {pa + offset:#x}: {reply!r}")

    def _select(self, cpu: int) -> None:
        if self._g_cpu != cpu:
            reply = self._channel.request(b"Hg%x" % cpu)
            if reply != b"OK":
                raise DriverError(f"QEMU has no vCPU {cpu}: {reply!r}")
            self._g_cpu = cpu

    def read_registers(self, cpu: int) -> RegisterFile:
        if self._plugin_held is not None:
            return self._held_registers(cpu)
        self._select(cpu)
        reply = self._channel.request(b"g")
        try:
            return RegisterFile.from_qemu_g(decode_hex(reply))
        except ValueError as exc:
            raise DriverError(f"unexpected register packet from QEMU: {exc}") from exc

    def _held_registers(self, cpu: int) -> RegisterFile:
        held = self._plugin_held
        assert held is not None
        if cpu == held.cpu:
            return held.registers
        if self._others is None:
            assert self._monitor is not None
            self._others = parse_info_registers(self._monitor.hmp("info registers -a"))
        if cpu not in self._others:
            raise DriverError(f"QEMU's monitor showed no registers for CPU#{cpu - 1}")
        return self._others[cpu]

    def _refuse_while_held(self, what: str) -> None:
        if self._plugin_held is not None:
            raise NotNow(
                f"{what} is not possible at this stop: vmigdb's QEMU plugin holds the machine "
                "inside QEMU, where plugin API 4 cannot write registers (vmigdb writes only the "
                "stopped vCPU's general registers there, and guest memory); QEMU's gdbstub can, "
                "at a stop it holds: after ^C, or at a plain breakpoint under `monitor "
                "plugin-breakpoints off` (the default; conditional and scoped breakpoints stay "
                "the plugin's)"
            )

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        if self._plugin_held is not None:
            self._write_held_register(self._plugin_held, cpu, regnum, value)
            return
        current = self.read_registers(cpu)
        qemu_regnum, raw = current.qemu_write(regnum, value)
        reply = self._channel.request(b"P%x=" % qemu_regnum + encode_hex(raw))
        if reply != b"OK":
            raise DriverError(f"QEMU refused a register write: {reply!r}")

    def _write_held_register(self, held: PluginStop, cpu: int, regnum: int, value: bytes) -> None:
        """At a stop the plugin holds: a general register of the held vCPU, through the plugin
        (runctl.c says how); a value a register already has, for any (GDB's `G` writes them
        all). Anything else is refused, saying what to do instead."""
        current = self._held_registers(cpu)
        name = REGISTERS[regnum].name
        if current.raw(regnum) == value and regnum not in current.unavailable:
            return
        if cpu != held.cpu or not held.writable or name not in GENERAL_REGISTERS:
            self._refuse_while_held(f"writing {name}")
        assert self._plugin is not None
        self._plugin.set_register(name, int.from_bytes(value, "little"))
        self._plugin_held = dataclasses.replace(held, registers=current.with_value(regnum, value))

    def insert_breakpoint(
        self,
        type: BreakpointType,
        addr: int,
        length: int,
        mechanism: str | None = None,
        scope_cr3: int | None = None,  # QEMU's breakpoints are virtual: the debugger filters hits
        conditions: tuple[bytes, ...] | None = None,
    ) -> None:
        if self._plugin is not None and type == BreakpointType.SOFTWARE and mechanism is None:
            # The plugin decides scope and conditions in QEMU, and its stops are held before the
            # instruction with no VM stop, so the steps that follow are the plugin's too (one
            # round trip each, not QEMU's vm_stop). Plain breakpoints go to QEMU's gdbstub
            # instead when the user wants register writes at their stops.
            plain = scope_cr3 is None and not conditions and self._plugin_held is None
            if not plain or self.plugin_breakpoints:
                self._plugin_breakpoint(addr, scope_cr3, conditions or ())
                return
        if type.is_watchpoint and self._plugin is not None:
            self._plugin_watch(type, addr, length)
            return
        if type.is_watchpoint:
            self._refuse_while_held("setting a watchpoint")
        if mechanism == PATCHED_INT3:
            self._patched.add((addr, length))
        self._z(b"Z", type, addr, length)

    def _plugin_breakpoint(
        self, addr: int, scope_cr3: int | None, conditions: tuple[bytes, ...]
    ) -> None:
        """At a stop the plugin holds, it flushes QEMU's translated code itself when it lets go;
        at a stop QEMU's gdbstub holds, vmigdb makes QEMU drop the code translated from `addr`."""
        assert self._plugin is not None
        new = addr not in self._plugin_bps
        self._plugin.set_breakpoint(addr, scope_cr3, conditions)
        self._plugin_bps.add(addr)
        if new and self._plugin_held is None:
            self._retranslate(addr, scope_cr3, whole_page=self._markers.needs(addr))
            self._mark_page(addr, scope_cr3)
        elif new:
            self._mark_page_while_held(addr, scope_cr3)

    def _mark_page_while_held(self, addr: int, scope_cr3: int | None) -> None:
        """QEMU's gdbstub is unreachable: a page without a marker gets one on the way (`_release`
        stops the machine for it). GDB takes its breakpoints out to step over one and puts them
        back, so most often the page still has its marker, or its removal is still owed: it
        stays, and the guest runs on with no stop on the way (a stop would end the vCPU's turn
        on QEMU's one icount thread, and under load give another vCPU's turn to the guest code
        it interrupts, which an RDTSC-timed block sees)."""
        owed = self._owed_markers.pop(addr & ~(PAGE - 1), None)
        if owed is not None:
            self._deferred.remove((int(BreakpointType.SOFTWARE), owed, 1))
            self._markers.add(addr, owed)
        elif not self._markers.needs(addr):
            self._markers.add(addr, None)
        else:
            self._unmarked[addr] = scope_cr3

    def _mark_page(self, addr: int, scope_cr3: int | None) -> None:
        """Make QEMU translate `addr`'s page one instruction per block (bp_pages.py)."""
        if not self._markers.needs(addr):
            self._markers.add(addr, None)
            return
        marker = None
        spaces = self._spaces_for(addr, scope_cr3)
        if scope_cr3 is None and self._g_cpu is not None and spaces:
            # The stopped vCPU's process first: user addresses differ between processes.
            regs = self.read_registers(self._g_cpu)
            spaces.insert(0, (cr3_tables(regs["cr3"]), spaces[0][1]))
        for cr3, mode in spaces:
            try:
                where = translate(self._memory.read, cr3, addr, mode)
                if isinstance(where, Translation):
                    code = self._memory.read(where.pa, min(32, PAGE - (addr & (PAGE - 1))))
                    marker = marker_in(code, addr)
                    break
            except PhysicalMemoryError:
                continue
        self._markers.add(addr, marker)
        if marker is not None:
            log.debug("marker at %#x: QEMU translates %#x's page one instruction per block", marker, addr)
            self._z(b"Z", BreakpointType.SOFTWARE, marker, 1)

    def _unmark_page(self, addr: int) -> None:
        self._unmarked.pop(addr, None)
        marker = self._markers.remove(addr)
        if marker is None:
            return
        if self._plugin_held is not None:
            self._deferred.append((int(BreakpointType.SOFTWARE), marker, 1))
            self._owed_markers[marker & ~(PAGE - 1)] = marker
        else:
            self._z(b"z", BreakpointType.SOFTWARE, marker, 1)

    def _stale_stop(self, stop: DriverStop) -> bool:
        """A gdbstub stop nobody asked for: at a breakpoint whose removal waited for this stop
        (it was removed while the plugin held the machine), or at a marker, where code jumped
        into the middle of an instruction (the marker goes, for good, on that page)."""
        if stop.cpu is None or stop.signal != 5 or stop.watch is not None:
            return False
        owed = {addr for type, addr, _ in self._deferred if type <= BreakpointType.HARDWARE}
        if not owed and not self._markers.markers():
            return False
        pc = self.read_registers(stop.cpu)["rip"]
        if pc in owed and pc not in self._plugin_bps:
            return True
        if not self._markers.is_marker(pc):
            return False
        log.info("the guest ran into the middle of an instruction at %#x; no marker there now", pc)
        self._markers.drop(pc)
        self._z(b"z", BreakpointType.SOFTWARE, pc, 1)
        return True

    def _plugin_watch(self, type: BreakpointType, addr: int, length: int) -> None:
        """QEMU's own watchpoints abort QEMU under icount with several vCPUs: the plugin serves
        them. The first one needs code retranslated with memory callbacks: at a held stop the
        plugin flushes at release; at a gdbstub stop it flushes at the next translation, which
        one-insn-per-tb makes immediate (turned off again when the plugin says `flushed`)."""
        assert self._plugin is not None
        first = not self._plugin_watches
        self._plugin.set_watch(type, addr, length)
        self._plugin_watches.add((type, addr, length))
        if first and self._plugin_held is None:
            self._watch_flush_pending = True

    def _on_watch_flushed(self) -> None:
        self._watch_flush_pending = False
        self._one_insn_per_tb(self._plugin_stepping)

    def _retranslate(self, addr: int, scope_cr3: int | None, whole_page: bool = False) -> None:
        """Make QEMU drop the code it translated from `addr` without the plugin's callback: write
        the instruction's first byte back, unchanged, through the gdbstub, at each physical
        address `addr` has in an address space that can run it (a physical write invalidates
        the translations of that byte; QEMU's own breakpoints flush nothing since QEMU 6.2). A
        user address goes through every process's page tables: a process that is not running
        may have its code translated, and shared code has one physical copy. A page no address
        space maps now has no translation that could be reused without a fresh one, except a
        page cache page another process maps later at the same address (said in the README).
        `whole_page`: the page is newly marked (bp_pages.py): all of its code is retranslated,
        one instruction per block, each with the plugin's follow callback."""
        written: set[int] = set()
        for cr3, mode in self._spaces_for(addr, scope_cr3):
            try:
                where = translate(self._memory.read, cr3, addr, mode)
                if not isinstance(where, Translation) or where.pa in written:
                    continue
                start = where.pa & ~(PAGE - 1) if whole_page else where.pa
                data = self._memory.read(start, PAGE if whole_page else 1)
            except PhysicalMemoryError:
                continue
            for at in range(0, len(data), REWRITE_CHUNK):  # QEMU's packets hold 4 KiB
                chunk = data[at : at + REWRITE_CHUNK]
                reply = self._channel.request(b"M%x,%x:" % (start + at, len(chunk)) + encode_hex(chunk))
                if reply != b"OK":
                    log.warning("QEMU refused the rewrite at %#x that retranslates it: %r", addr, reply)
                    break
            written.add(where.pa)

    def _spaces_for(self, addr: int, scope_cr3: int | None) -> list[tuple[int, PagingMode]]:
        """The page tables (CR3 base, paging mode) to find `addr`'s physical copies through."""
        if not self._cpus:
            return []
        first = self.read_registers(self._cpus[0])
        mode = paging_mode(first["cr0"], first["cr4"], first["efer"])
        if scope_cr3 is not None:
            return [(cr3_tables(scope_cr3), mode)]
        cpus = [first, *(self.read_registers(cpu) for cpu in self._cpus[1:])]
        bases = [cr3_tables(regs["cr3"]) for regs in cpus]
        # With page-table isolation a vCPU in user mode runs on the user half of a pair whose
        # kernel half, 4 KiB below, maps the kernel.
        bases += [base & ~0x1000 for base in bases if base & 0x1000]
        if addr < KERNEL_HALF and self.address_spaces is not None:
            bases += [cr3_tables(cr3) for cr3 in self.address_spaces()]
        return [(base, mode) for base in dict.fromkeys(bases)]

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> None:
        if addr in self._plugin_bps and type == BreakpointType.SOFTWARE:
            assert self._plugin is not None
            self._plugin.remove_breakpoint(addr)
            self._plugin_bps.discard(addr)
            self._unmark_page(addr)
            return
        if (type, addr, length) in self._plugin_watches:
            assert self._plugin is not None
            self._plugin.remove_watch(type, addr, length)
            self._plugin_watches.discard((type, addr, length))
            return
        if self._plugin_held is not None:  # QEMU's gdbstub is unreachable: at its next stop
            self._deferred.append((int(type), addr, length))
            return
        self._z(b"z", type, addr, length)
        self._patched.discard((addr, length))

    def _z(self, verb: bytes, type: BreakpointType, addr: int, length: int) -> None:
        patched = (addr, length) in self._patched
        if self.accel == "kvm" and type == BreakpointType.SOFTWARE and not patched:
            # QEMU would write 0xCC into guest RAM: use a hardware slot instead.
            type = BreakpointType.HARDWARE
        reply = self._channel.request(b"%s%d,%x,%x" % (verb, int(type), addr, length))
        if reply != b"OK":
            raise DriverError(f"QEMU refused {verb.decode()}{int(type)} at {addr:#x}: {reply!r}")
        if verb == b"Z":
            self._held.add((int(type), addr, length))
        else:
            self._held.discard((int(type), addr, length))

    # -- giving an attached VM back ----------------------------------------------------------------

    def release(self, run: bool) -> None:
        """Leave QEMU's gdbstub with nothing of ours in QEMU: stopped, no breakpoint, no
        single-step armed on any vCPU; then let the VM run (`run`) or leave it stopped. The
        gdbstub itself is removed by whoever added it (attach.py)."""
        if self._channel.running:
            self.interrupt()
            self.wait_stop(10.0)
        for cpu in sorted(self._armed):
            # QEMU 7.2 disarms a vCPU's single-step only when that vCPU reports a stop: step it
            # alone (one instruction), or it would stop the VM with nobody attached.
            log.info("CPU#%d has a single-step armed in QEMU; stepping it off", cpu - 1)
            if self._icount_smp:
                self._set_step_flags([cpu])
            self._channel.resume(b"vCont;s:%x" % cpu)
            self.wait_stop(10.0)
            self._armed.discard(cpu)
        for type, addr, length in sorted(self._held):
            self._channel.request(b"z%d,%x,%x" % (type, addr, length))
        self._held.clear()
        self._patched.clear()
        if self._sstep != QEMU_DEFAULT_SSTEP:
            self._set_step_flags([])
        if run:
            # QEMU's detach removes what breakpoints remain and starts the VM (vm_start).
            reply = self._channel.request(b"D")
            if reply != b"OK":
                raise DriverError(f"QEMU refused to detach: {reply!r}")

    # -- run control ------------------------------------------------------------------------------

    def resume(self, actions: dict[int, str]) -> None:
        if not actions:
            raise DriverError("resume with no vCPU to run")
        if self._plugin_held is not None:
            self._release(actions)
            return
        if self._icount_smp:
            self._set_step_flags([cpu for cpu, action in actions.items() if action == "s"])
        if all(actions.get(cpu) == "c" for cpu in self._cpus):
            packet = b"vCont;c"
        else:
            parts = [b"%s:%x" % (action.encode(), cpu) for cpu, action in sorted(actions.items())]
            packet = b"vCont;" + b";".join(parts)
        self._send_resume(actions, packet)

    def _release(self, actions: dict[int, str]) -> None:
        """Let go of the stop the plugin holds: the held vCPU continues or steps (in QEMU, by
        the plugin); under icount the others run with it, as after QEMU's vCont."""
        held = self._plugin_held
        assert held is not None and self._plugin is not None
        steppers = [cpu for cpu, action in actions.items() if action == "s"]
        if steppers and steppers != [held.cpu]:
            raise DriverError(
                f"at a stop vmigdb's QEMU plugin holds only CPU#{held.cpu - 1} can step"
            )
        # While the plugin steps, QEMU translates one instruction per block, so each step ends
        # at a block's start, where QEMU's vCPU state (flags included) is complete.
        self._plugin_stepping = bool(steppers)
        self._one_insn_per_tb(self._plugin_stepping or self._watch_flush_pending)
        # Breakpoints set at this stop have no page marker yet (bp_pages.py), and only QEMU's
        # gdbstub can set one: on a continue, it stops the machine on the way to set them. The
        # ^C goes after the monitor's last word: QEMU's main loop then waits for the vCPU.
        marking = bool(self._unmarked) and not steppers
        if marking:
            self._channel.interrupt()
            time.sleep(MARK_STOP_GRACE_S)  # QEMU reads the ^C and waits for the held vCPU
        self._plugin.go(held.cpu, STEP if steppers else CONTINUE)
        self._plugin_held = None
        self._others = None
        if self._run_started is None:
            self._run_started = time.monotonic()
        if marking:
            self._mark_on_the_way(actions)

    def _mark_on_the_way(self, actions: dict[int, str]) -> None:
        """The machine stops as soon as the released vCPU ends its translation block (QEMU's
        ^C came first): mark the new breakpoints' pages and run on as asked. Under icount the
        guest cannot time this stop. A breakpoint QEMU's gdbstub serves that was hit instead
        is hit again at once; a plugin hit in the rest of that block must be let go (QEMU is
        waiting for that vCPU), which the log says."""
        packet = self._gdbstub_stop(10.0, "QEMU stopped the machine to mark breakpoint pages")
        if packet is None:
            packet = self._channel.wait_stop(1.0)  # resynchronises QEMU's gdbstub
        stop = parse_stop(packet)
        if stop is not None and stop.cpu is not None:
            self._g_cpu = stop.cpu
            self._armed.discard(stop.cpu)  # QEMU disarms the vCPU it reports
        self._after_gdbstub_stop()
        if stop is not None and stop.signal == SIGINT:
            self._give_turn_back()
        self.resume(actions)

    def _gdbstub_stop(self, timeout: float, why: str) -> bytes | None:
        """QEMU's stop reply to a resume or a ^C, within `timeout` (None: none came). A vCPU
        that runs into the plugin meanwhile is let go (QEMU's gdbstub waits for it), which the
        log says."""
        deadline = time.monotonic() + timeout
        while (packet := self._channel.poll_stop()) is None:
            if self._plugin is not None and (late := self._plugin.poll()) is not None:
                log.warning("CPU#%d reached %#x while %s; that hit is let go", late.cpu - 1, late.pc, why)
                self._plugin.go(late.cpu, CONTINUE)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self._selector is not None:
                self._selector.select(min(left, 0.05))
            else:
                time.sleep(min(left, 0.001))
        return packet

    def _give_turn_back(self) -> None:
        """After a ^C stop on QEMU's one icount thread: the interrupted vCPU runs first again
        (turns.py says why and how)."""
        if not self._icount_smp or self._armed:
            return
        view = TurnView(
            cpus=lambda: list(self._cpus),
            registers=self.read_registers,
            halted=self.halted,
            request=self._channel.request,
            held=lambda pc: (int(BreakpointType.SOFTWARE), pc, 1) in self._held,
            zero_stop=self._zero_stop,
        )
        cpu = give_turn_back(view)
        if cpu is not None:
            log.debug("QEMU's next turn is CPU#%d's again, which the ^C interrupted", cpu - 1)

    def _zero_stop(self, packet: bytes, timeout: float) -> int | None:
        self._channel.resume(packet)
        why = "vmigdb gave a vCPU its turn back"
        reply = self._gdbstub_stop(timeout, why)
        if reply is not None:
            return self._stop_cpu(reply)
        self._channel.interrupt()
        self._stop_cpu(self._gdbstub_stop(5.0, why) or self._channel.wait_stop(1.0))
        return None

    def _stop_cpu(self, reply: bytes) -> int | None:
        stop = parse_stop(reply)
        if stop is None or stop.cpu is None:
            return None
        self._g_cpu = stop.cpu  # QEMU's Hg follows the vCPU it reports
        return stop.cpu

    def _one_insn_per_tb(self, on: bool) -> None:
        if self._monitor is not None and on != self._one_insn:
            self._monitor.hmp(f"one-insn-per-tb {'on' if on else 'off'}")
            self._one_insn = on

    def _send_resume(self, actions: dict[int, str], packet: bytes) -> None:
        self._plugin_stepping = False
        self._one_insn_per_tb(self._watch_flush_pending)
        self._g_cpu = None  # QEMU may move its selected vCPU to the one that stops next
        self._channel.resume(packet)
        if self._run_started is None:
            self._run_started = time.monotonic()
        self._driven = dict(actions)
        self._resume_packet = packet
        self._armed |= {cpu for cpu, action in actions.items() if action == "s"}

    def _leftover_step(self, stop: DriverStop) -> bool:
        """A stop of a vCPU asked to continue that only QEMU's stale single-step explains: absorb
        it by resuming as asked again (the stop itself has now disarmed it)."""
        return (
            stop.cpu in self._armed
            and self._driven.get(stop.cpu) == "c"
            and stop.signal == 5
            and stop.watch is None
            and stop.exited is None
        )

    def stop_fileno(self) -> int:
        if self._selector is not None:
            return self._selector.fileno()  # readable when QEMU or the plugin has said something
        return self._channel.fileno()

    def _plugin_stop(self, stop: PluginStop | None) -> DriverStop | None:
        """A stop the plugin holds; one that races an interrupt is let go (the interrupt's stop
        comes from QEMU's gdbstub, which waits for it)."""
        if stop is None:
            return None
        assert self._plugin is not None
        if self._interrupting:
            self._plugin.go(stop.cpu, CONTINUE)
            return None
        self._plugin_held = stop
        self._others = None
        if stop.kind == "error":
            log.info("a condition at %#x could not be evaluated in QEMU; stopping", stop.pc)
        return self._note(DriverStop(cpu=stop.cpu, signal=5, watch=stop.watch))

    def _after_gdbstub_stop(self) -> None:
        if self._plugin is not None:
            self._plugin.stopped()
        deferred, self._deferred = self._deferred, []
        self._owed_markers.clear()
        for type, addr, length in deferred:
            self._z(b"z", BreakpointType(type), addr, length)
        unmarked, self._unmarked = self._unmarked, {}
        for addr, scope_cr3 in unmarked.items():
            if addr in self._plugin_bps and self._markers.needs(addr):
                self._retranslate(addr, scope_cr3, whole_page=True)
            if addr in self._plugin_bps:
                self._mark_page(addr, scope_cr3)

    def poll_stop(self) -> DriverStop | None:
        if self._plugin is not None:
            try:
                stop = self._plugin_stop(self._plugin.poll())
            except MachineGone:
                return self._note(DriverStop(cpu=None, signal=9, exited=self.exit_status or 0))
            if stop is not None:
                return stop
        try:
            while (packet := self._channel.poll_stop()) is not None:
                stop = self._on_stop_reply(packet)
                if stop is not None:
                    return stop
        except ResumeRefused:
            self._armed -= {cpu for cpu, action in self._driven.items() if action == "s"}
            raise
        except MachineGone:
            return self._note(DriverStop(cpu=None, signal=9, exited=self.exit_status or 0))
        return None

    def wait_stop(self, timeout: float) -> DriverStop:
        if self._plugin is not None and self._selector is not None:
            deadline = time.monotonic() + timeout
            while True:
                stop = self.poll_stop()
                if stop is not None:
                    return stop
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the machine did not stop")
                self._selector.select(min(left, 0.5))
        try:
            while True:
                stop = self._on_stop_reply(self._channel.wait_stop(timeout))
                if stop is not None:
                    return stop
        except MachineGone:
            return self._note(DriverStop(cpu=None, signal=9, exited=self.exit_status or 0))

    def _on_stop_reply(self, packet: bytes) -> DriverStop | None:
        """A stop QEMU reported, or None when it was absorbed and the guest runs again."""
        stop = parse_stop(packet)
        if stop is None:
            raise DriverError(f"unexpected stop reply from QEMU: {packet!r}")
        if stop.cpu is not None:
            # At every stop QEMU points its Hg at the vCPU it reports (gdb_set_stop_cpu): no Hg
            # round trip is needed to read the stopped vCPU's registers. Noted before anything
            # below reads another vCPU's registers (which moves Hg again).
            self._g_cpu = stop.cpu
        elif stop.exited is None:
            stop = DriverStop(self._cpus[0] if self._cpus else 1, stop.signal, stop.watch)
        leftover = self._leftover_step(stop) and not self._interrupting
        self._armed.discard(stop.cpu)
        if leftover:
            self.leftover_steps += 1
            log.info("CPU#%d stopped on a single-step QEMU had left armed; resuming", stop.cpu - 1)
            self._send_resume(self._driven, self._resume_packet)
            return None
        stale = self._stale_stop(stop)
        self._after_gdbstub_stop()
        if stale and not self._interrupting:
            self._send_resume(self._driven, self._resume_packet)
            return None
        if stale:  # it came before the ^C did: this is the stop the ^C asked for
            stop = DriverStop(stop.cpu, SIGINT)
        if stop.signal == SIGINT and stop.exited is None:
            self._give_turn_back()
        return self._note(stop)

    def _note(self, stop: DriverStop) -> DriverStop:
        self._interrupting = False
        if self._run_started is not None:
            self._ran += time.monotonic() - self._run_started
            self._run_started = None
        if stop.exited is not None:
            self.exit_status = stop.exited
        return stop

    def interrupt(self) -> None:
        if self._plugin_held is not None:
            return  # already stopped
        if self._channel.running:
            self._interrupting = True
            self._channel.interrupt()

    def kill(self) -> None:
        """Ask QEMU to quit (vKill: QEMU answers OK, then exits)."""
        try:
            if self._plugin_held is not None:  # QEMU's gdbstub would wait for the held vCPU
                self._release({self._plugin_held.cpu: "c"})
            if self._channel.running:
                self._channel.interrupt()
                self._channel.wait_stop(5.0)
            self._channel.resume(b"vKill;1")  # QEMU answers OK and exits: nothing more is owed
        except (MachineGone, DriverError, TimeoutError):
            pass

    def close(self) -> None:
        if self._plugin is not None:
            try:
                if self._plugin_held is not None:
                    self._plugin.go(self._plugin_held.cpu, CONTINUE)
            except (MachineGone, DriverError):
                pass
            self._plugin.close()
        if self._monitor is not None:
            self._monitor.close()
        self._channel.close()

    def ran_seconds(self) -> float:
        """Host seconds the VM has run under this driver, the current run included."""
        running = time.monotonic() - self._run_started if self._run_started is not None else 0.0
        return self._ran + running

    def _bring_up(self) -> tuple[str | None, str | None]:
        """`bring_up_report` for the vCPUs as they are now (nothing to tell while the VM runs,
        with 1 vCPU, or if QEMU will not give a vCPU's registers)."""
        if len(self._cpus) < 2 or self._channel.running:
            return None, None
        try:
            cr0s = {cpu: self.read_registers(cpu)["cr0"] for cpu in self._cpus}
        except (DriverError, MachineGone) as exc:
            log.debug("vCPU modes not read: %s", exc)
            return None, None
        return bring_up_report(cr0s, self.ran_seconds(), self.time_mode)

    def warnings(self) -> list[str]:
        """What is wrong with this QEMU or this guest's run, for `monitor info` and `monitor
        stealth`: QEMU's known defects, and a vCPU the guest did not bring up under icount."""
        return self._warnings(self._bring_up()[1])

    def _warnings(self, stuck: str | None) -> list[str]:
        return [*known_defects(self.qemu_version), *([stuck] if stuck else [])]

    def describe(self) -> list[tuple[str, str]]:
        time = self.capabilities.guest_time
        version = version_text(self.qemu_version)
        note, stuck = self._bring_up()
        return [
            ("driver", f"qemu {version} ({self.accel})"),
            *[("warning", text) for text in self._warnings(stuck)],
            ("vcpus", f"{len(self._cpus)}" + (f" ({note})" if note else "")),
            ("guest RAM", f"{self._memory.size // (1 << 20)} MiB, {self._memory.how}"),
            (
                "guest time",
                f"{time.description if time else 'host time; the TSC runs on while stopped'} "
                f"({self.time_reason})",
            ),
            (
                "gdbstub channel",
                f"{self._channel.resyncs} resynchronisation(s), "
                f"{self.leftover_steps} stale single-step stop(s) absorbed",
            ),
            *([("run control", self.plugin_note)] if self.plugin_note else []),
            *self.notes,
        ]
