"""libvmi's event registration on the model: which events it accepts, refuses, and clears.

Sources (libvmi 8f9b010, the commit the 3.7.1 wheel is built from, with ENABLE_SAFETY_CHECKS):
libvmi/events.c (vmi_register_event, vmi_clear_event, register_mem_event_*, the single-step
calls) and libvmi/driver/xen/xen_events.c (xen_set_reg_access, xen_set_mem_access,
xen_set_int3_access, xen_start_single_step). Events are `vmi_event_t` cdata from the real
`_libvmi.ffi`, keyed as libvmi keys them.
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
    SPECIFIC_MSR_IDS,
    VMI_EVENTS_VERSION,
    VMI_FAILURE,
    VMI_INIT_EVENTS,
    VMI_SUCCESS,
    XCR0,
)
from tests.support.xenmodel.errors import NotModelled, XenError
from tests.support.xenmodel.lib_state import Instance, c_int, errprint
from tests.support.xenmodel.p2m import Perm

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


FUNCTIONS = {
    "vmi_register_event": vmi_register_event, "vmi_clear_event": vmi_clear_event,
    "vmi_toggle_single_step_vcpu": vmi_toggle_single_step_vcpu,
}
