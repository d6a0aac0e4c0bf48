"""libvmi's listen on the model: taking requests off the ring, the callbacks, the responses.

Sources: libvmi 8f9b010 driver/xen/xen_events.c (xen_events_listen, process_requests_7,
process_request, process_software_breakpoint, process_register, process_msr,
process_singlestep, process_mem, process_debug_exception, process_response). Callbacks are
called through the event's `callback` pointer -- the wheel's own `generic_event_callback` -- so
the Python side runs exactly as it would on Xen, answer conversion included.
"""

from __future__ import annotations

from tests.support.xenmodel.constants import (
    CR0,
    CR3,
    CR4,
    INT3,
    MEM_R,
    MEM_W,
    MEM_X,
    MSR_ALL,
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
    VMI_FAILURE,
    VMI_INIT_EVENTS,
    VMI_PM_IA32E,
    VMI_SUCCESS,
)
from tests.support.xenmodel.domain import Injection
from tests.support.xenmodel.exits import X86_EVENTTYPE_SW_EXCEPTION
from tests.support.xenmodel.lib_access import CDEF_X86_FIELDS
from tests.support.xenmodel.lib_events import clear_now
from tests.support.xenmodel.lib_state import Instance, c_int, errprint
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
    "vmi_are_events_pending": vmi_are_events_pending, "vmi_events_listen": vmi_events_listen,
}
