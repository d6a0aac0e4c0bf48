"""libvmi's event API on the model: registration rules, listen, and the per-reason processing.

Sources (libvmi 8f9b010, the commit the 3.7.1 wheel is built from, with ENABLE_SAFETY_CHECKS):
libvmi/events.c (vmi_register_event, vmi_clear_event, register_mem_event_*, the single-step
calls) and libvmi/driver/xen/xen_events.c (xen_set_*_access, process_*, process_response,
xen_events_listen). Events are `vmi_event_t` cdata from the real `_libvmi.ffi`; callbacks are
called through the event's `callback` pointer, i.e. through the wheel's own
`generic_event_callback`, so the Python side runs exactly as it would on Xen.
"""

from __future__ import annotations

from tests.support.xenmodel.constants import (
    CR0,
    CR3,
    CR4,
    EV_DEBUG,
    EV_INTERRUPT,
    EV_MEMORY,
    EV_REGISTER,
    EV_SINGLESTEP,
    INT3,
    INT_NEXT,
    MEM_INVALID,
    MEM_N,
    MEM_R,
    MEM_RW,
    MEM_RWX,
    MEM_RWX2N,
    MEM_RX,
    MEM_W,
    MEM_W2X,
    MEM_WX,
    MEM_X,
    MSR_ALL,
    MSR_ANY,
    REG_N,
    REG_R,
    REG_RW,
    REG_W,
    RESPONSE_DENY,
    RESPONSE_EMULATE,
    RESPONSE_EMULATE_NOWRITE,
    RESPONSE_GET_NEXT_INTERRUPT,
    RESPONSE_MAX_BIT,
    RESPONSE_NEXT_SLAT_ID,
    RESPONSE_SET_EMUL_INSN,
    RESPONSE_SET_EMUL_READ_DATA,
    RESPONSE_SET_REGISTERS,
    RESPONSE_SLAT_ID,
    RESPONSE_TOGGLE_SINGLESTEP,
    SPECIFIC_MSR_IDS,
    VMI_EVENTS_VERSION,
    VMI_FAILURE,
    VMI_INIT_EVENTS,
    VMI_PM_IA32E,
    VMI_SUCCESS,
    XCR0,
)
from tests.support.xenmodel.domain import Injection
from tests.support.xenmodel.errors import NotModelled, XenError
from tests.support.xenmodel.exits import X86_EVENTTYPE_SW_EXCEPTION
from tests.support.xenmodel.lib_core import CDEF_X86_FIELDS
from tests.support.xenmodel.lib_state import Instance, c_int, errprint
from tests.support.xenmodel.p2m import Perm
from tests.support.xenmodel.paging import Access
from tests.support.xenmodel.vmevent import (
    FLAG_ALTERNATE_P2M,
    FLAG_DENY,
    FLAG_EMULATE,
    FLAG_EMULATE_NOWRITE,
    FLAG_FAST_SINGLESTEP,
    FLAG_GET_NEXT_INTERRUPT,
    FLAG_SET_EMUL_INSN_DATA,
    FLAG_SET_EMUL_READ_DATA,
    FLAG_SET_REGISTERS,
    FLAG_TOGGLE_SINGLESTEP,
    FLAG_VCPU_PAUSED,
    Reason,
    Request,
    Response,
)

CR_NUMBER = {CR0: 0, CR3: 3, CR4: 4}
# libvmi/msr-index.c msr_all[] (the MSRs MSR_ALL monitors), as architectural indexes
MSR_ALL_INDEXES = frozenset({
    0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102, 0xC0000103,
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F, 0x2FF,
    0x400, 0x401, 0x402, 0x403, 0x404, 0x280, 0x8B, 0xC0000104, 0x0, 0x1, 0x10, 0x17, 0x2A,
    0x2C, 0x3A, 0x174, 0x175, 0x176, 0x1A0})
# convert_vmi_flags_to_xenmem (xen_events_private.h): the access that TRAPS -> what Xen allows
TRAP_TO_PERM = {MEM_N: Perm.RWX, MEM_W: Perm.RX, MEM_X: Perm.RW, MEM_RW: Perm.X, MEM_WX: Perm.R,
                MEM_RWX: Perm.N}
# event_response_conversion (xen_events_private.h); bits beyond NEXT_SLAT_ID are fork/vmtrace
RESPONSE_TO_FLAGS = {RESPONSE_EMULATE: FLAG_EMULATE,
                     RESPONSE_EMULATE_NOWRITE: FLAG_EMULATE | FLAG_EMULATE_NOWRITE,
                     RESPONSE_SET_EMUL_READ_DATA: FLAG_SET_EMUL_READ_DATA,
                     RESPONSE_DENY: FLAG_DENY, RESPONSE_TOGGLE_SINGLESTEP: FLAG_TOGGLE_SINGLESTEP,
                     RESPONSE_SLAT_ID: FLAG_ALTERNATE_P2M,
                     RESPONSE_SET_REGISTERS: FLAG_SET_REGISTERS,
                     RESPONSE_SET_EMUL_INSN: FLAG_SET_EMUL_INSN_DATA,
                     RESPONSE_GET_NEXT_INTERRUPT: FLAG_GET_NEXT_INTERRUPT,
                     RESPONSE_NEXT_SLAT_ID: FLAG_FAST_SINGLESTEP}
ACCESS_BITS = {Access.READ: MEM_R, Access.WRITE: MEM_W, Access.FETCH: MEM_X}


def _key(ffi, event) -> int:
    return int(ffi.cast("uintptr_t", event))


# --- registration -------------------------------------------------------------------------------
def vmi_register_event(ctx, vmi, event) -> int:
    inst = ctx.instance(vmi)
    if inst is None or not inst.init_flags & VMI_INIT_EVENTS or not event:
        return VMI_FAILURE
    if event.version != VMI_EVENTS_VERSION or not event.callback:
        return VMI_FAILURE
    register = {EV_REGISTER: _register_reg, EV_MEMORY: _register_mem,
                EV_SINGLESTEP: _register_singlestep, EV_INTERRUPT: _register_interrupt,
                EV_DEBUG: _register_debug}.get(event.type)
    if register is None:
        raise NotModelled(f"event type {event.type}")
    return register(ctx, inst, event)


def _register_reg(ctx, inst: Instance, event) -> int:
    reg = event.reg_event.reg
    if getattr(event.reg_event, "async"):
        raise NotModelled("asynchronous register events")
    if reg == MSR_ANY and event.reg_event.msr:
        msr = event.reg_event.msr
        if msr in inst.msr_events:  # register_msr_event
            return VMI_FAILURE
        if _set_reg_access(inst, event) != VMI_SUCCESS:
            return VMI_FAILURE
        inst.msr_events[msr] = event
        return VMI_SUCCESS
    if reg in inst.reg_events:
        return VMI_FAILURE  # "An event is already registered on this reg"
    if _set_reg_access(inst, event) != VMI_SUCCESS:
        return VMI_FAILURE
    inst.reg_events[reg] = event
    return VMI_SUCCESS


def _set_reg_access(inst: Instance, event) -> int:
    """xen_set_reg_access: CRs and MSR_ALL/MSR_ANY only; write events only (Xen has no reads)."""
    reg, access = event.reg_event.reg, event.reg_event.in_access
    if reg in SPECIFIC_MSR_IDS:
        errprint("xen_set_reg_access error: use MSR_ANY type for specific MSR event registration")
        return VMI_FAILURE
    if reg not in (CR0, CR3, CR4, XCR0, MSR_ALL, MSR_ANY):
        errprint(f"xen_set_reg_access error: no system support for event type ({reg})")
        return VMI_FAILURE
    if access in (REG_R, REG_RW):
        errprint("Register read events are unavailable in Xen.")
        return VMI_FAILURE
    if access not in (REG_N, REG_W):
        errprint(f"Unknown register access mode: {access}")
        return VMI_FAILURE
    enable = access == REG_W
    intercepts, xen = inst.domain.intercepts, inst.xen
    if reg in CR_NUMBER or reg == XCR0:
        number = CR_NUMBER.get(reg, "xcr0")
        if enable == xen.monitor_cr_on.get(number, False):
            return VMI_FAILURE  # "if ( enable == xe->monitor_crN_on ) goto done"
        xen.monitor_cr_on[number] = enable
        if number != "xcr0":
            (intercepts.cr.add if enable else intercepts.cr.discard)(number)
            onchange = intercepts.cr_onchange
            (onchange.add if enable and event.reg_event.onchange else onchange.discard)(number)
        return VMI_SUCCESS
    if reg == MSR_ALL:
        if enable == xen.monitor_msr_on:
            return VMI_FAILURE
        xen.monitor_msr_on = enable
        (intercepts.msrs.update if enable else intercepts.msrs.difference_update)(MSR_ALL_INDEXES)
        return VMI_SUCCESS
    msr = event.reg_event.msr  # MSR_ANY
    if not msr:
        return VMI_FAILURE
    (intercepts.msrs.add if enable else intercepts.msrs.discard)(msr)
    return VMI_SUCCESS


def _register_mem(ctx, inst: Instance, event) -> int:
    mem = event.mem_event
    if mem.generic:
        # register_mem_event_generic: gfn ~0, no page-specific handlers, one per access type.
        if mem.gfn != 0xFFFF_FFFF_FFFF_FFFF or inst.mem_events_on_gfn:
            return VMI_FAILURE
        if mem.in_access in inst.mem_events_generic:
            return VMI_FAILURE
        inst.mem_events_generic[mem.in_access] = event
        return VMI_SUCCESS
    # register_mem_event_on_gfn: no generic handlers, ONE event per gfn (whatever the view).
    if mem.in_access == MEM_INVALID or inst.mem_events_generic:
        return VMI_FAILURE
    if mem.gfn in inst.mem_events_on_gfn:
        return VMI_FAILURE  # "An event is already registered on this page"
    if set_mem_access(inst, mem.gfn, mem.in_access, event.slat_id) != VMI_SUCCESS:
        return VMI_FAILURE
    inst.mem_events_on_gfn[mem.gfn] = event
    return VMI_SUCCESS


def set_mem_access(inst: Instance, gfn: int, trap: int, slat_id: int) -> int:
    """xen_set_mem_access: convert (with the EPT sanity check) and set in the host or a view."""
    if trap in (MEM_R, MEM_RX):
        errprint("intel_mem_access_sanity_check error: can't set requested memory access, "
                 "unsupported by EPT.")  # write-only / write-execute EPT entries misconfigure
        return VMI_FAILURE
    if trap in (MEM_W2X, MEM_RWX2N):
        raise NotModelled("automatic access conversions (W2X, RWX2N)")
    perm = TRAP_TO_PERM.get(trap)
    if perm is None:
        errprint("convert_vmi_flags_to_xenmem error: invalid memaccess setting requested")
        return VMI_FAILURE
    try:
        inst.domain.set_mem_access(slat_id, gfn, perm)
    except XenError as exc:
        errprint(f"xc_set_mem_access failed with code: -{exc.errno}")
        return VMI_FAILURE
    inst.max_physical_address = max(inst.max_physical_address, gfn << 12)
    return VMI_SUCCESS


def _register_singlestep(ctx, inst: Instance, event) -> int:
    n = len(inst.domain.vcpus)
    wanted = [vcpu for vcpu in range(n) if event.ss_event.vcpus >> vcpu & 1]
    if any(vcpu in inst.ss_events for vcpu in wanted):
        return VMI_FAILURE  # "An event is already registered on this vcpu"
    if _start_single_step(inst, event) != VMI_SUCCESS:
        return VMI_FAILURE
    for vcpu in wanted:
        inst.ss_events[vcpu] = event
    return VMI_SUCCESS


def _start_single_step(inst: Instance, event) -> int:
    """xen_start_single_step: turn the monitor on; flip MTF only if `enable` is set."""
    inst.xen.monitor_singlestep_on = True
    inst.domain.intercepts.singlestep = True
    if not (event.ss_event.vcpus and event.ss_event.enable):
        return VMI_SUCCESS
    for vcpu in range(32):
        if event.ss_event.vcpus >> vcpu & 1:
            try:
                inst.domain.debug_control(vcpu, True)
            except XenError:
                errprint(f"Error setting MTF flag on vcpu {vcpu}")
                for undo in range(min(vcpu, len(inst.domain.vcpus)) - 1, -1, -1):
                    inst.domain.debug_control(undo, False)
                return VMI_FAILURE
    return VMI_SUCCESS


def _register_interrupt(ctx, inst: Instance, event) -> int:
    intr = event.interrupt_event.intr
    if intr in inst.interrupt_events:
        return VMI_FAILURE
    if intr == INT3:
        if inst.xen.monitor_intr_on:
            return VMI_FAILURE
        inst.xen.monitor_intr_on = True
        inst.domain.intercepts.int3 = True  # xc_monitor_software_breakpoint
    elif intr != INT_NEXT:
        errprint(f"Xen driver does not support enabling events for interrupt: {intr}")
        return VMI_FAILURE
    inst.interrupt_events[intr] = event
    return VMI_SUCCESS


def _register_debug(ctx, inst: Instance, event) -> int:
    if inst.debug_event is not None:
        return VMI_FAILURE
    inst.xen.monitor_debug_on = True
    inst.domain.intercepts.debug = True  # xc_monitor_debug_exceptions(enable, sync)
    inst.debug_event = event
    return VMI_SUCCESS


# --- clearing and single-step control -----------------------------------------------------------
def vmi_clear_event(ctx, vmi, event, free_routine) -> int:
    inst = ctx.instance(vmi)
    if inst is None or not inst.init_flags & VMI_INIT_EVENTS or not event:
        return VMI_FAILURE
    if inst.event_callback:
        # Not while requests may still refer to it: queued, done at the end of listen.
        key = _key(ctx.ffi, event)
        if key in inst.clear_events:
            return VMI_FAILURE  # "Event was already queued for clearing."
        inst.clear_events[key] = event
        return VMI_SUCCESS
    return clear_now(ctx, inst, event)


def clear_now(ctx, inst: Instance, event) -> int:
    kind = event.type
    if kind == EV_SINGLESTEP:
        status = VMI_FAILURE
        for vcpu in range(len(inst.domain.vcpus)):
            if event.ss_event.vcpus >> vcpu & 1:
                inst.domain.debug_control(vcpu, False)
                status = VMI_SUCCESS
                if not inst.shutting_down:
                    inst.ss_events.pop(vcpu, None)
        if not inst.ss_events:
            _shutdown_single_step(inst)
        return status
    if kind == EV_REGISTER:
        reg, msr = event.reg_event.reg, event.reg_event.msr
        table, key = (inst.reg_events, reg) if reg in inst.reg_events else (inst.msr_events, msr)
        if key not in table or (table is inst.msr_events and reg != MSR_ANY):
            return VMI_FAILURE
        saved = event.reg_event.in_access
        event.reg_event.in_access = REG_N
        status = _set_reg_access(inst, event)
        event.reg_event.in_access = saved
        if status == VMI_SUCCESS:
            del table[key]
        return status
    if kind == EV_INTERRUPT:
        intr = event.interrupt_event.intr
        if intr not in inst.interrupt_events:
            return VMI_FAILURE
        if intr == INT3:
            inst.xen.monitor_intr_on = False
            inst.domain.intercepts.int3 = False
        del inst.interrupt_events[intr]
        return VMI_SUCCESS
    if kind == EV_MEMORY:
        mem = event.mem_event
        if mem.generic:
            inst.mem_events_generic.pop(mem.in_access, None)
            return VMI_SUCCESS
        status = set_mem_access(inst, mem.gfn, MEM_N, event.slat_id)
        if status == VMI_SUCCESS:
            inst.mem_events_on_gfn.pop(mem.gfn, None)
        return status
    if kind == EV_DEBUG:
        if inst.debug_event is None:
            return VMI_FAILURE
        inst.xen.monitor_debug_on = False
        inst.domain.intercepts.debug = False
        inst.debug_event = None
        return VMI_SUCCESS
    return VMI_FAILURE


def _shutdown_single_step(inst: Instance) -> None:
    """xen_shutdown_single_step: MTF off everywhere, single-step reporting off."""
    for vcpu in range(len(inst.domain.vcpus)):
        inst.domain.debug_control(vcpu, False)
    inst.xen.monitor_singlestep_on = False
    inst.domain.intercepts.singlestep = False


def vmi_toggle_single_step_vcpu(ctx, vmi, event, vcpu, enabled) -> int:
    inst = ctx.instance(vmi)
    vcpu = c_int(vcpu, 32, what="uint32_t")
    if inst is None or not inst.init_flags & VMI_INIT_EVENTS or not event:
        return VMI_FAILURE
    if inst.event_callback:
        errprint("To toggle singlestep while in an event callback, use "
                 "VMI_EVENT_RESPONSE_TOGGLE_SINGLESTEP")
        return VMI_FAILURE
    if enabled:
        event.ss_event.vcpus |= 1 << vcpu
        existed = vcpu in inst.ss_events
        inst.ss_events[vcpu] = event
        if existed:
            return VMI_FAILURE  # g_hash_table_insert reports a replaced key
        return _start_single_step(inst, event)
    event.ss_event.vcpus &= ~(1 << vcpu)
    if inst.ss_events.pop(vcpu, None) is None:
        return VMI_FAILURE
    try:
        inst.domain.debug_control(vcpu, False)
    except XenError:
        return VMI_FAILURE
    return VMI_SUCCESS


# --- listen -----------------------------------------------------------------------------------------
def vmi_are_events_pending(ctx, vmi) -> int:
    inst = ctx.instance(vmi)
    if inst is None or not inst.init_flags & VMI_INIT_EVENTS:
        return -1
    return len(inst.domain.ring)


def vmi_events_listen(ctx, vmi, timeout) -> int:
    """xen_events_listen: wait (the model runs the guest for `timeout` ms worth of
    instructions), process every request on the ring, apply clears queued by callbacks, and
    notify Xen only if something was processed -- responses of a listen that failed stay on
    the ring unread until a later listen notifies."""
    inst = ctx.instance(vmi)
    timeout = c_int(timeout, 32, what="uint32_t")
    if inst is None or not inst.init_flags & VMI_INIT_EVENTS:
        return VMI_FAILURE
    domain = inst.domain
    if not inst.shutting_down and not domain.ring:
        domain.run(max(timeout, 1) * ctx.instructions_per_ms)
    status, processed = _process_requests(ctx, inst)
    if status != VMI_SUCCESS:
        return VMI_FAILURE
    if inst.clear_events:
        domain.pause()
        status, extra = _process_requests(ctx, inst)
        processed += extra
        for event in list(inst.clear_events.values()):
            clear_now(ctx, inst, event)
        inst.clear_events.clear()
        domain.unpause()
        if status != VMI_SUCCESS:
            return VMI_FAILURE
    if processed:
        domain.notify()
    return VMI_SUCCESS


def _process_requests(ctx, inst: Instance) -> tuple[int, int]:
    processed = 0
    while (request := inst.domain.take_request()) is not None:
        response = _process_request(ctx, inst, request)
        if response is None:
            return VMI_FAILURE, processed  # consumed, never answered: that vCPU stays paused
        inst.domain.push_response(response)
        processed += 1
    return VMI_SUCCESS, processed


def _process_request(ctx, inst: Instance, request: Request) -> Response | None:
    process = {Reason.SOFTWARE_BREAKPOINT: _process_int3, Reason.MEM_ACCESS: _process_mem,
               Reason.WRITE_CTRLREG: _process_cr, Reason.MOV_TO_MSR: _process_msr,
               Reason.SINGLESTEP: _process_singlestep,
               Reason.DEBUG_EXCEPTION: _process_debug}[request.reason]
    if not request.flags & FLAG_ALTERNATE_P2M:
        request.altp2m_idx = 0
    return process(ctx, inst, request)


def _prepare(ctx, event, request: Request):
    regs = ctx.ffi.new("x86_registers_t *")
    for name in CDEF_X86_FIELDS:
        if name in request.regs:
            setattr(regs, name, request.regs[name])
    event.x86_regs = regs
    event.slat_id = request.altp2m_idx
    event.vcpu_id = request.vcpu_id
    event.page_mode = VMI_PM_IA32E
    return regs


def _callback(ctx, inst: Instance, event, request: Request, regs) -> Response:
    """Call the event's C callback pointer, then process_response."""
    inst.event_callback = True
    try:
        answer = event.callback(inst.handle, event)
    finally:
        inst.event_callback = False
    response = Response(request.vcpu_id, flags=request.flags & FLAG_VCPU_PAUSED)
    for bit in range(1, RESPONSE_MAX_BIT + 1):
        if answer & (1 << bit) and (1 << bit) in RESPONSE_TO_FLAGS:
            response.flags |= RESPONSE_TO_FLAGS[1 << bit]
    if answer & RESPONSE_SLAT_ID:
        response.altp2m_idx = event.slat_id
    if response.flags & FLAG_SET_REGISTERS:
        response.regs = {name: getattr(regs, name) for name in CDEF_X86_FIELDS}
    return response


def _process_int3(ctx, inst: Instance, request: Request) -> Response | None:
    event = inst.interrupt_events.get(INT3)
    if event is None:
        return None
    rip = request.regs["rip"]
    intr = event.interrupt_event
    intr.gfn, intr.reinject = request.gfn, -1
    intr.insn_length, intr.offset, intr.gla = request.exit.insn_length, rip & 0xFFF, rip
    regs = _prepare(ctx, event, request)
    response = _callback(ctx, inst, event, request, regs)
    if intr.reinject == 0:
        return response
    if intr.reinject == -1:
        errprint("process_software_breakpoint Need to specify reinjection behaviour!")
        return None
    inst.domain.inject_trap(request.vcpu_id, Injection(3, X86_EVENTTYPE_SW_EXCEPTION,
                                                       intr.insn_length))
    return response


def _process_debug(ctx, inst: Instance, request: Request) -> Response | None:
    event = inst.debug_event
    if event is None:
        errprint("process_debug_exception error: no debug event handler is registered")
        return None
    rip, debug = request.regs["rip"], event.debug_event
    debug.reinject, debug.gla, debug.offset = -1, rip, rip & 0xFFF
    debug.gfn, debug.type = request.gfn, request.exit.event_type
    debug.insn_length = request.exit.insn_length
    regs = _prepare(ctx, event, request)
    response = _callback(ctx, inst, event, request, regs)
    if debug.reinject == -1:
        errprint("process_debug_exception Need to specify reinjection behaviour!")
        return None
    if debug.reinject:
        inst.domain.inject_trap(request.vcpu_id, Injection(1, request.exit.event_type,
                                                           debug.insn_length,
                                                           cr2=request.regs["cr2"]))
    return response


def _process_cr(ctx, inst: Instance, request: Request) -> Response | None:
    reg = {0: CR0, 3: CR3, 4: CR4}[request.exit.index]
    event = inst.reg_events.get(reg)
    if event is None:
        errprint(f"Unhandled register event caught: {request.exit.index}")
        return None
    if event.reg_event.equal and event.reg_event.equal != request.exit.new:
        return Response(request.vcpu_id, flags=request.flags, altp2m_idx=request.altp2m_idx)
    event.reg_event.value, event.reg_event.previous = request.exit.new, request.exit.old
    regs = _prepare(ctx, event, request)
    return _callback(ctx, inst, event, request, regs)


def _process_msr(ctx, inst: Instance, request: Request) -> Response | None:
    event = inst.reg_events.get(MSR_ALL) or inst.msr_events.get(request.exit.msr)
    if event is None:
        errprint(f"Unhandled MSR event caught: {request.exit.msr:#x}")
        return None
    reg = event.reg_event
    reg.msr, reg.value, reg.previous = request.exit.msr, request.exit.new, request.exit.old
    regs = _prepare(ctx, event, request)
    return _callback(ctx, inst, event, request, regs)


def _process_singlestep(ctx, inst: Instance, request: Request) -> Response | None:
    event = inst.ss_events.get(request.vcpu_id)
    if event is None:
        errprint("process_singlestep error: no singlestep handler is registered in LibVMI")
        return None
    rip = request.regs["rip"]
    event.ss_event.gfn, event.ss_event.offset, event.ss_event.gla = request.gfn, rip & 0xFFF, rip
    regs = _prepare(ctx, event, request)
    return _callback(ctx, inst, event, request, regs)


def _process_mem(ctx, inst: Instance, request: Request) -> Response | None:
    violation = request.exit
    out_access = ACCESS_BITS[violation.access]
    event = inst.mem_events_on_gfn.get(request.gfn)
    if event is not None and event.mem_event.in_access & out_access:
        return _mem_callback(ctx, inst, event, request, out_access)
    response = None
    for access, generic in list(inst.mem_events_generic.items()):
        if access & out_access:  # every matching generic handler runs; the last answer wins
            response = _mem_callback(ctx, inst, generic, request, out_access)
    if response is None:
        errprint(f"Caught a memory event that had no handler registered in LibVMI @ GFN "
                 f"{request.gfn:#x} ({(request.gfn << 12) + violation.offset:#x}), "
                 f"access: {out_access}")
    return response


def _mem_callback(ctx, inst: Instance, event, request: Request, out_access: int) -> Response:
    violation, mem = request.exit, event.mem_event
    regs = _prepare(ctx, event, request)
    mem.gptw, mem.gla_valid, mem.gla = 0, 1, violation.gla  # issue_mem_cb
    mem.gfn, mem.offset, mem.out_access = request.gfn, violation.offset, out_access
    return _callback(ctx, inst, event, request, regs)


FUNCTIONS = {
    "vmi_register_event": vmi_register_event, "vmi_clear_event": vmi_clear_event,
    "vmi_toggle_single_step_vcpu": vmi_toggle_single_step_vcpu,
    "vmi_are_events_pending": vmi_are_events_pending, "vmi_events_listen": vmi_events_listen,
}
