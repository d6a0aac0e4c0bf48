"""The Xen driver's state and its libvmi event callbacks. Everything here runs on the event thread.

Each vCPU follows one small state machine:
- it runs in its home view (the home view, or its address space's scoped view: `views.py`);
- an access it must not see trapped (a read or write of a page carrying a breakpoint, any access to
  a watched page) is served *clean*: the callback answers "view 0 + arm MTF", the vCPU executes that
  one instruction on the original pages, and the MTF callback puts it back in its home view (after
  re-copying the shadows of a page it wrote, and reporting a watchpoint it hit);
- our int3 is consumed (reinject 0) and, when GDB should see it, the machine stops there with the
  vCPU already placed for its clean step: whatever GDB does next (step over, continue), the
  original instruction runs once in view 0; the guest's own int3 is reinjected, reaching its
  handler exactly once;
- a GDB step arms MTF (`SingleStepEvent`, one per vCPU) and stops at its event.

All-stop: a callback that decides to stop pauses the domain (Xen's pause is reference-counted:
vmigdb holds exactly one reference while stopped). Events of the same batch that come after are
held: an int3 or a trapped access is answered so that it happens again once the guest runs (the
vCPU has not moved), a completed watch hit or MSR write is queued and reported at the next resume.

libvmi 3.7.1 wheel behaviour this relies on (libvmi notes; the Xen model follows it):
- a callback's answer must be an object with `.value` (`EventResponse` is a plain Enum whose
  members do not OR, and a bare int becomes 0: bug 8), and the view travels in the cffi event's
  `slat_id`;
- `event.out_access` is a plain Enum: compare `.value` bits;
- a callback that raises is only a warning from cffi, answered 0; an IntEvent answered without
  `reinject` leaves the vCPU paused for good. Every callback here is wrapped (`_guarded`);
- `toggle_single_step_vcpu` is refused inside a callback (the TOGGLE_SINGLESTEP answer is used
  there) and arms MTF only for an event whose `enable` is set, on every vCPU of its mask: one
  event per vCPU, toggled off then on;
- a CR3 event's `x86_regs` hold the old CR3; the write is done (`event.value` is the new one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmigdb.arch.x86_64.paging import cr3_tables, paging_mode
from vmigdb.errors import log_internal_error
from vmigdb.hv.base import BreakpointType, DriverError, DriverStop
from vmigdb.hv.xen.catches import Catches
from vmigdb.hv.xen.targets import (
    WATCH_TRAP,
    ExecBreak,
    Translate,
    Watch,
    access_size,
    cr3_base,
)
from vmigdb.hv.xen.views import PAGE, R, Views, W, X

log = logging.getLogger("vmigdb.hv.xen")

SIGINT, SIGTRAP = 2, 5
WATCH_USER = "watch"
HOLD_USER = "hold"


class Flags:
    """A callback's answer: libvmi's EventResponse members do not OR (bug 8), so an object whose
    `.value` is the OR of the response bits."""

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = value


@dataclass
class Vcpu:
    index: int  # 0-based, libvmi's
    step_event: Any = None
    view: int = 0  # the altp2m view it is in (as last set or reported)
    mtf: bool = False  # MTF armed
    clean: bool = False  # in view 0 for one instruction, then home
    written: set[int] = field(default_factory=set)  # pages written during the clean step
    watch: tuple[BreakpointType, int] | None = None  # a watch hit, reported after the access
    action: str | None = "c"  # what this run asked of it: 'c', 's', or None (held)


class Engine:
    def __init__(self, vmi: Any, binding: Any, handle: Any, publish: Callable[[DriverStop], None]):
        self.vmi = vmi
        self.b = binding
        self._publish = publish
        self.views = Views(vmi, binding, handle)
        self.catches = Catches(self)
        self.translate = Translate(self.read_physical)
        self.vcpus = [Vcpu(i) for i in range(vmi.get_num_vcpus())]
        self.breaks: dict[tuple[int, int, int], ExecBreak] = {}
        self.watches: dict[tuple[int, int, int], Watch] = {}
        self.running = False
        self.candidates: list[tuple[DriverStop, bool]] = []  # this batch's stops (queueable?)
        self._last_cpu = 0  # the vCPU of the last stop reported (the next goes round from it)
        self.queued: list[DriverStop] = []  # stops that happened while another was being made
        self.interrupt_requested = False
        self._events: list[Any] = []  # registered while the views are active
        self._cr3_event: Any = None
        self._frozen: set[int] = set()  # pages held vCPUs execute from (no execute permission)
        R_ = binding.event.EventResponse
        self.SLAT, self.TOGGLE = R_.SLAT_ID.value, R_.TOGGLE_SINGLESTEP.value
        self.ram_end = vmi.get_max_physical_address()
        vmi.pause_vm()  # the driver starts stopped; vmigdb holds one pause reference while so

    # -- memory ---------------------------------------------------------------------------------------

    def read_physical(self, pa: int, length: int) -> bytes:
        from vmigdb.arch.x86_64.paging import PhysicalMemoryError

        if pa < 0 or pa + length > self.ram_end:
            raise PhysicalMemoryError(f"{pa:#x}+{length:#x} is outside guest RAM")
        try:
            return self.vmi.read_pa(pa, length)[0]
        except self.b.libvmi.LibvmiError as exc:
            raise PhysicalMemoryError(f"libvmi could not read {pa:#x}: {exc}") from None

    def write_physical(self, pa: int, data: bytes) -> None:
        if pa < 0 or pa + len(data) > self.ram_end:
            raise DriverError(f"{pa:#x}+{len(data):#x} is outside guest RAM")
        try:
            self.vmi.write_pa(pa, data)
        except self.b.libvmi.LibvmiError as exc:
            raise DriverError(f"libvmi could not write {pa:#x}: {exc}") from None
        for gfn in range(pa // PAGE, (pa + max(len(data), 1) - 1) // PAGE + 1):
            self.views.refresh(gfn)  # the guest must execute what was written

    # -- address spaces -------------------------------------------------------------------------------

    def _mode_and_spaces(self, scope: int | None):
        """The paging mode, and the page tables to translate GDB's addresses with."""
        owner = self.vmi.get_vcpuregs(0)  # keep it: `x86` points into its memory
        regs = owner.cffi_regs.x86
        mode = paging_mode(regs.cr0, regs.cr4, regs.msr_efer)
        if scope is not None:
            return mode, [cr3_tables(scope)]
        cr3s = []
        for vcpu in self.vcpus:
            tables = cr3_tables(self.vmi.get_vcpureg(self.b.libvmi.X86Reg.CR3.value, vcpu.index))
            if tables not in cr3s:
                cr3s.append(tables)
        return mode, cr3s

    def home_view(self, cr3: int) -> int:
        return self.views.view_for(cr3_base(cr3))

    # -- breakpoints and watchpoints --------------------------------------------------------------------

    def insert(self, type: BreakpointType, addr: int, length: int, scope: int | None) -> None:
        key = (int(type), addr, length)
        if key in self.breaks or key in self.watches:
            return
        mode, spaces = self._mode_and_spaces(scope)
        scope = cr3_base(scope) if scope is not None else None
        if type.is_watchpoint:
            watch = Watch(type, addr, length, self.translate.ranges(spaces, addr, length, mode))
            self.activate()
            self.watches[key] = watch
            self._watch_traps(watch.gfns())
            return
        pas = self.translate.places(spaces, addr, 1, mode)
        self.activate()
        bp = ExecBreak(addr, scope, [(pa // PAGE, pa % PAGE) for pa in pas])
        if scope is None:
            bp.views = self.views.guest_views()
        else:
            bp.views = [self._scoped_view(scope)]
        for view in bp.views:
            for gfn, offset in bp.places:
                self.views.plant(view, gfn, offset)
        self.breaks[key] = bp

    def remove(self, type: BreakpointType, addr: int, length: int) -> None:
        key = (int(type), addr, length)
        if (watch := self.watches.pop(key, None)) is not None:
            self._watch_traps(watch.gfns())
        if (bp := self.breaks.pop(key, None)) is not None:
            for view in bp.views:
                for gfn, offset in bp.places:
                    self.views.unplant(view, gfn, offset)

    def _watch_traps(self, gfns: set[int]) -> None:
        for gfn in gfns:
            bits = 0
            for watch in self.watches.values():
                if gfn in watch.gfns():
                    bits |= WATCH_TRAP[watch.type]
            self.views.traps.want(gfn, WATCH_USER, bits)

    def _scoped_view(self, scope: int) -> int:
        view = self.views.scoped.get(scope)
        if view is not None:
            return view
        if len(self.views.guest_views()) >= 9:  # Xen has 10 views; view 0 is the clean one
            raise DriverError("too many address spaces with breakpoints of their own (Xen: 8)")
        view = self.views.create_scoped(scope)
        for bp in self.breaks.values():  # every address space sees the unscoped breakpoints
            if bp.scope is None:
                bp.views.append(view)
                for gfn, offset in bp.places:
                    self.views.plant(view, gfn, offset)
        if self._cr3_event is None:
            E = self.b.event
            event = E.RegEvent(self.b.libvmi.X86Reg.CR3, E.RegAccess.W, self._guarded(self._on_cr3))
            event.cffi_event.reg_event.onchange = 1  # to_cffi leaves it: only real switches
            self.vmi.register_event(event)
            self._cr3_event = event
        return view

    # -- activation: views and events exist only while something needs them ----------------------------

    def activate(self) -> None:
        if self.views.active:
            return
        self.views.activate()
        E = self.b.event
        int3 = E.IntEvent(self._guarded(self._on_int3, int3=True))
        mem = E.MemEvent(E.MemAccess.RWX, self._guarded(self._on_mem), generic=True)
        self._events = [int3, mem]
        for vcpu in self.vcpus:
            # One event per vCPU, registered dormant: toggling arms MTF on every vCPU of the mask.
            vcpu.step_event = E.SingleStepEvent(
                [vcpu.index], self._guarded(self._on_step), enable=False
            )
            self._events.append(vcpu.step_event)
        try:
            for event in self._events:
                self.vmi.register_event(event)
            self.vmi.slat_switch(self.views.home)
        except self.b.libvmi.LibvmiError as exc:
            self.deactivate()
            raise DriverError(f"libvmi refused the events vmigdb needs: {exc}") from None
        for vcpu in self.vcpus:
            vcpu.view = self.views.home

    def needed(self) -> bool:
        return bool(self.breaks or self.watches or self.catches.exec_written is not None)

    def deactivate(self) -> None:
        """Clear every event, view and shadow frame (the domain is paused, no request pending)."""
        for event in [*self._events, *([self._cr3_event] if self._cr3_event else [])]:
            try:
                self.vmi.clear_event(event)
            except self.b.libvmi.LibvmiError:
                pass  # never registered (a failed activation)
        self._events, self._cr3_event = [], None
        if self.views.active:
            self.vmi.slat_switch(0)
            self.views.teardown()
        for vcpu in self.vcpus:
            vcpu.view, vcpu.mtf, vcpu.clean, vcpu.watch, vcpu.step_event = (
                0,
                False,
                False,
                None,
                None,
            )
            vcpu.written.clear()
        self.breaks.clear()
        self.watches.clear()
        self._frozen.clear()

    # -- run control ----------------------------------------------------------------------------------

    def resume(self, actions: dict[int, str]) -> None:
        """Run: `actions` maps 1-based vCPUs to 'c' or 's'.

        A vCPU not named should stay stopped (GDB steps one thread over a breakpoint so), but Xen
        pauses whole domains and libvmi has no per-vCPU pause. Such a vCPU is *held* instead: the
        page it executes from loses execute permission in the guest views, so its next fetch
        traps and is answered "again" until the stop; a vCPU that does run executes that page's
        instructions one at a time from the clean view. Whatever a held vCPU meets happens again
        once it is resumed, or is queued."""
        if self.queued:  # a stop that happened while another was being made: report it now
            self._publish(self.queued.pop(0))
            return
        steps = [cpu - 1 for cpu, action in actions.items() if action == "s"]
        if steps:
            self.activate()
        elif self.views.active and not self.needed():
            self.deactivate()
        for vcpu in self.vcpus:
            vcpu.action = actions.get(vcpu.index + 1)
        self._hold([vcpu for vcpu in self.vcpus if vcpu.action is None])
        if self.views.active:
            for vcpu in self.vcpus:
                home = self._home_of(vcpu)
                if vcpu.mtf and not vcpu.clean and vcpu.action == "c" and vcpu.view == home:
                    self._set_mtf(vcpu, False)  # left from holding it: it runs freely now
                elif not vcpu.mtf and (vcpu.action == "s" or (vcpu.action and vcpu.view != home)):
                    self._set_mtf(vcpu, True)  # a step, or a vCPU to move to its home view
        self.candidates = []
        self.interrupt_requested = False
        self.vmi.resume_vm()
        self.running = True

    def _home_of(self, vcpu: Vcpu) -> int:
        return self.home_view(self.vmi.get_vcpureg(self.b.libvmi.X86Reg.CR3.value, vcpu.index))

    def _hold(self, held: list[Vcpu]) -> None:
        """Take execute permission from the pages the held vCPUs execute from (and give it back
        to the pages of the vCPUs held last time)."""
        frozen: set[int] = set()
        if held:
            self.activate()
            for vcpu in held:
                if not vcpu.clean:  # a clean step finishes its instruction first, in view 0
                    gfn = self._code_gfn(vcpu.index)
                    if gfn is not None:
                        frozen.add(gfn)
        for gfn in self._frozen - frozen:
            self.views.traps.want(gfn, HOLD_USER, 0)
        for gfn in frozen - self._frozen:
            self.views.traps.want(gfn, HOLD_USER, X)
        self._frozen = frozen

    def _code_gfn(self, index: int) -> int | None:
        owner = self.vmi.get_vcpuregs(index)  # keep it: `x86` points into its memory
        regs = owner.cffi_regs.x86
        mode = paging_mode(regs.cr0, regs.cr4, regs.msr_efer)
        pa = self.translate.pa(cr3_tables(regs.cr3), regs.rip, mode)
        return None if pa is None else pa // PAGE

    def _set_mtf(self, vcpu: Vcpu, on: bool) -> None:
        """Arm or disarm MTF on one vCPU, outside callbacks: its event is toggled off (which also
        unregisters it) and on again, armed only if `enable` is set -- it must stay registered,
        since callbacks arm MTF by their answer."""
        event = vcpu.step_event
        event.enable = on
        try:
            self.vmi.toggle_single_step_vcpu(event, vcpu.index, False)
        except self.b.libvmi.LibvmiError:
            pass
        self.vmi.toggle_single_step_vcpu(event, vcpu.index, True)
        vcpu.mtf = on

    def after_listen(self) -> None:
        """Between two listens: publish the stop the callbacks decided on, or honour an interrupt.

        When several vCPUs stopped in one batch, GDB hears of the one next in turn after the last
        reported (else the vCPU Xen happens to run first would starve the others); the rest stay
        on their int3 and hit again later, or are queued if they cannot happen again."""
        if not self.candidates and self.interrupt_requested:
            self.vmi.pause_vm()
            self.candidates.append((DriverStop(1, SIGINT), False))
        if not self.candidates:
            return
        # Answer what is already on the ring, held (it happens again once the guest runs): no
        # vCPU may wait on a request while stopped, or later find its handler gone.
        self.vmi.listen(0)
        count = len(self.vcpus)
        order = sorted(
            range(len(self.candidates)),
            key=lambda i: ((self.candidates[i][0].cpu or 1) - self._last_cpu - 1) % count,
        )
        chosen = self.candidates[order[0]][0]
        self.queued += [
            stop for i, (stop, queue) in enumerate(self.candidates) if queue and i != order[0]
        ]
        self.candidates = []
        self.running = False
        self.interrupt_requested = False
        self._last_cpu = chosen.cpu or 1
        self._publish(chosen)

    def _stop_here(self, stop: DriverStop, *, queue: bool) -> None:
        """Stop the machine on this event (`after_listen` chooses among a batch's stops). A held
        vCPU's is queued (a completed access or MSR write) or dropped (it happens again)."""
        held = stop.cpu is not None and self.vcpus[stop.cpu - 1].action is None
        if not self.running or held:
            if queue:
                self.queued.append(stop)
            return
        if not self.candidates:
            self.vmi.pause_vm()
        self.candidates.append((stop, queue))

    def _holding(self) -> bool:
        return bool(self.candidates) or not self.running

    # -- callbacks ------------------------------------------------------------------------------------

    def _guarded(self, callback, *, int3: bool = False):
        """A callback that cannot raise into cffi (which would answer 0, and for an int3 leave the
        vCPU paused for good): a bug is logged and the guest served as safely as can be."""

        def call(vmi, event):
            try:
                return callback(event)
            except Exception as exc:  # noqa: BLE001 - never into libvmi
                log_internal_error(log, f"in the {callback.__name__} callback", exc)
                if int3:
                    ours = self.views.planted(event.cffi_event.slat_id, event.gfn, event.offset)
                    event.reinject = 0 if ours else 1
                return Flags()

        call.__name__ = callback.__name__
        return call

    def _vcpu(self, event) -> Vcpu:
        vcpu = self.vcpus[event.vcpu_id]
        vcpu.view = event.cffi_event.slat_id
        return vcpu

    def _clean_step(self, event, vcpu: Vcpu) -> Flags:
        """Answer: run this one instruction in view 0 (the original pages, nothing trapped)."""
        vcpu.clean = True
        vcpu.view = 0
        event.cffi_event.slat_id = 0
        flags = self.SLAT
        if not vcpu.mtf:
            flags |= self.TOGGLE
            vcpu.mtf = True
        return Flags(flags)

    def _on_int3(self, event) -> Flags | None:
        vcpu = self._vcpu(event)
        if not self.views.planted(vcpu.view, event.gfn, event.offset):
            event.reinject = 1  # the guest's own: delivered to its handler, once
            return None
        event.reinject = 0  # ours: consumed
        if not self.running or vcpu.action is None:
            return Flags()  # it stays on the int3 and hits again when it runs
        if vcpu.action == "s":
            return self._clean_step(event, vcpu)  # the instruction being stepped is under it
        if self._reportable(event):
            # A hit for GDB: the vCPU stays on the int3 (GDB steps it over, which runs the
            # original instruction clean, or continues and it hits again).
            self._stop_here(DriverStop(vcpu.index + 1, SIGTRAP), queue=False)
            return Flags()
        if self._holding():
            return Flags()
        return self._clean_step(event, vcpu)  # not for GDB (another alias, another space)

    def _reportable(self, event) -> bool:
        place = (event.gfn, event.offset)
        space = cr3_base(event.x86_regs.cr3)
        return any(
            bp.va == event.gla and place in bp.places and bp.scope in (None, space)
            for bp in self.breaks.values()
        )

    def _on_step(self, event) -> Flags:
        vcpu = self._vcpu(event)
        flags = 0
        if vcpu.mtf:
            flags |= self.TOGGLE
            vcpu.mtf = False
        if vcpu.clean:
            vcpu.clean = False
            for gfn in vcpu.written:
                self.views.refresh(gfn)  # the guest wrote the original: re-copy, re-plant
            vcpu.written.clear()
        if self.views.active:
            home = self.home_view(event.x86_regs.cr3)
            if vcpu.view != home:
                event.cffi_event.slat_id = home
                vcpu.view = home
                flags |= self.SLAT
        watch, vcpu.watch = vcpu.watch, None
        cpu = vcpu.index + 1
        stepped = vcpu.action == "s"
        if stepped:
            vcpu.action = "c"
        if watch is not None:
            self._stop_here(DriverStop(cpu, SIGTRAP, watch=watch), queue=True)
        elif stepped:
            self._stop_here(DriverStop(cpu, SIGTRAP), queue=False)
        return Flags(flags)

    def _on_mem(self, event) -> Flags:
        vcpu = self._vcpu(event)
        if self._holding() or vcpu.action is None or vcpu.view == 0:
            return Flags()  # the access happens again once it runs
        gfn, access = event.gfn, event.out_access.value  # a plain Enum: compare its value
        rip, gla = event.x86_regs.rip, event.gla
        stop = None
        if access & X:
            stop = self.catches.executed(vcpu.index + 1, gfn, event.x86_regs.cr3, rip)
        same_page = bool(access & W) and rip // PAGE == gla // PAGE
        if access & W:
            self.catches.written(gfn)
        watch = self._watch_hit(event, gfn, access) if self.watches else None
        if stop is not None:
            self._stop_here(stop, queue=True)
            return Flags()  # the fetch happens again (allowed) once the guest runs
        if watch is not None or same_page or self.views.effective(vcpu.view, gfn) & access:
            if watch is not None:
                vcpu.watch = watch
            if access & W and self.views.shadowed(gfn):
                vcpu.written.add(gfn)
            return self._clean_step(event, vcpu)
        return Flags()  # nothing traps it any more: it completes when retried

    def _watch_hit(self, event, gfn: int, access: int) -> tuple[BreakpointType, int] | None:
        pa = gfn * PAGE + event.offset
        regs = event.x86_regs
        size = 8
        try:
            mode = paging_mode(regs.cr0, regs.cr4, regs.msr_efer)
            code_pa = self.translate.pa(cr3_tables(regs.cr3), regs.rip, mode)
            if code_pa is not None:
                size = access_size(self.vmi.read_pa(code_pa, 15, padding=True)[0], regs.rip)
        except self.b.libvmi.LibvmiError:
            pass
        for watch in self.watches.values():
            if watch.hit(pa, size, access & (R | W)):
                return watch.type, watch.va
        return None

    def _on_cr3(self, event) -> Flags | None:
        vcpu = self._vcpu(event)
        if vcpu.clean or not self.views.active:
            return None  # its MTF event puts it in the right view
        home = self.home_view(event.value)  # x86_regs.cr3 is still the old one
        if vcpu.view == home:
            return None
        event.cffi_event.slat_id = home
        vcpu.view = home
        return Flags(self.SLAT)

    # -- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the domain as vmigdb found it: nothing registered, running, unmonitored."""
        if self.running:
            self.vmi.pause_vm()
            self.running = False
            self.vmi.listen(0)
        self.catches.clear()
        self.deactivate()
        self.vmi.resume_vm()
        self.vmi.destroy()

    def describe(self) -> list[tuple[str, str]]:
        views = self.views
        if not views.active:
            view_text = "none (no breakpoint, watchpoint, step or exec-written catch in use)"
        else:
            parts = [f"{views.home} (home: {len(self.breaks)} breakpoint(s))"]
            parts += [f"{view} (address space {cr3:#x})" for cr3, view in views.scoped.items()]
            view_text = ", ".join(parts)
        where = ", ".join(f"CPU#{v.index}: view {v.view}" for v in self.vcpus)
        events = []
        if views.active:
            events += [
                "int3 (exception bitmap)",
                f"MTF single-step x{len(self.vcpus)}",
                f"EPT access on {views.traps.trapped_pages()} page(s) in view(s) "
                f"{', '.join(map(str, views.guest_views()))}",
            ]
        if self._cr3_event is not None:
            events.append("CR3 write")
        events += self.catches.describe()
        return [
            ("altp2m views", view_text),
            ("vCPU views", where if views.active else "all in the host p2m"),
            ("shadow frames", f"{len(views.shadow)} in use, {len(views.frames)} allocated"),
            ("events", ", ".join(events) or "none"),
            ("watchpoints", str(len(self.watches))),
        ]
