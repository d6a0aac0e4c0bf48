"""libvmi's altp2m (SLAT) calls and the exports the wheel's cdef leaves out (notes, bug 7).

libvmi/slat.c forwards to libvmi/driver/xen/altp2m.c, which makes the xc_altp2m_* hypercalls;
the domain model refuses what Xen refuses (p2m.py cites where). vmi_set_mem_event, vmi_alloc_gfn
and friends are reachable on the real wheel only through an ABI-mode dlopen of its .so; the
model offers them with the same C signatures.
"""

from __future__ import annotations

import errno

from tests.support.xenmodel.constants import MEM_N, VMI_FAILURE, VMI_SUCCESS
from tests.support.xenmodel.errors import XenError
from tests.support.xenmodel.lib_events import set_mem_access
from tests.support.xenmodel.lib_state import c_int, errprint
from tests.support.xenmodel.p2m import Perm


def _call(ctx, vmi, what: str, action) -> int:
    inst = ctx.instance(vmi)
    if inst is None:
        return VMI_FAILURE
    try:
        action(inst)
    except XenError as exc:
        errprint(f"{what} returned rc: -{exc.errno}")
        return VMI_FAILURE
    return VMI_SUCCESS


def vmi_slat_get_domain_state(ctx, vmi, state) -> int:
    def get(inst) -> None:
        if inst.domain.p2m.altp2m_mode == "disabled":
            raise XenError(errno.EINVAL, "altp2m disabled for the domain")
        state[0] = inst.domain.p2m.active
    return _call(ctx, vmi, "xc_altp2m_get_domain_state", get)


def vmi_slat_set_domain_state(ctx, vmi, state) -> int:
    return _call(ctx, vmi, "xc_altp2m_set_domain_state",
                 lambda inst: inst.domain.altp2m_set_domain_state(bool(state)))


def vmi_slat_create(ctx, vmi, slat_id) -> int:
    def create(inst) -> None:
        slat_id[0] = inst.domain.p2m.create_view(Perm.RWX)  # XENMEM_access_rwx default
    return _call(ctx, vmi, "xc_altp2m_create_view", create)


def vmi_slat_destroy(ctx, vmi, slat_idx) -> int:
    idx = c_int(slat_idx, 16, what="uint16_t")
    return _call(ctx, vmi, "xc_altp2m_destroy_view",
                 lambda inst: inst.domain.altp2m_destroy_view(idx))


def vmi_slat_switch(ctx, vmi, slat_idx) -> int:
    idx = c_int(slat_idx, 16, what="uint16_t")
    return _call(ctx, vmi, "xc_altp2m_switch_to_view",
                 lambda inst: inst.domain.altp2m_switch_to_view(idx))


def vmi_slat_change_gfn(ctx, vmi, slat_idx, old_gfn, new_gfn) -> int:
    idx = c_int(slat_idx, 16, what="uint16_t")
    old, new = c_int(old_gfn, what="addr_t"), c_int(new_gfn, what="addr_t")
    return _call(ctx, vmi, "xc_altp2m_change_gfn",
                 lambda inst: inst.domain.altp2m_change_gfn(idx, old, new))


def vmi_set_mem_event(ctx, vmi, gfn, access, slat_id) -> int:
    """events.c vmi_set_mem_event: refused unless a generic handler covers `access`."""
    inst = ctx.instance(vmi)
    gfn, access = c_int(gfn, what="addr_t"), c_int(access, 8, what="vmi_mem_access_t")
    slat_id = c_int(slat_id, 16, what="uint16_t")
    if inst is None:
        return VMI_FAILURE
    if access != MEM_N and not any(key & access for key in inst.mem_events_generic):
        return VMI_FAILURE  # "It is unsafe to set mem access without a handler being registered!"
    return set_mem_access(inst, gfn, access, slat_id)


def vmi_alloc_gfn(ctx, vmi, gfn) -> int:
    """xen_alloc_gfn: xc_domain_populate_physmap_exact. The model refuses an already-populated
    gfn (stricter than Xen, which would replace the frame)."""
    gfn = c_int(gfn, what="uint64_t")

    def alloc(inst) -> None:
        inst.domain.populate(gfn)
        inst.max_physical_address = max(inst.max_physical_address, (gfn + 1) << 12)
    return _call(ctx, vmi, "xen_alloc_gfn error allocating gfn", alloc)


def vmi_free_gfn(ctx, vmi, gfn) -> int:
    gfn = c_int(gfn, what="uint64_t")
    return _call(ctx, vmi, "xen_free_gfn error freeing gfn",
                 lambda inst: inst.domain.decrease_reservation(gfn))


def vmi_get_next_available_gfn(ctx, vmi) -> int:
    inst = ctx.instance(vmi)
    return inst.domain.p2m.max_gfn() + 1 if inst is not None else 0


def vmi_stop_single_step_vcpu(ctx, vmi, event, vcpu) -> int:
    inst = ctx.instance(vmi)
    vcpu = c_int(vcpu, 32, what="uint32_t")
    if inst is None or not event:
        return VMI_FAILURE
    event.ss_event.vcpus &= ~(1 << vcpu)
    inst.ss_events.pop(vcpu, None)
    return _call(ctx, vmi, "xc_domain_debug_control",
                 lambda inst: inst.domain.debug_control(vcpu, False))


def vmi_shutdown_single_step(ctx, vmi) -> int:
    inst = ctx.instance(vmi)
    if inst is None or inst.xen is None:
        return VMI_FAILURE
    inst.ss_events.clear()  # vmi_shutdown_single_step recreates the table; events stay as-is
    for vcpu in range(len(inst.domain.vcpus)):
        inst.domain.debug_control(vcpu, False)
    inst.xen.monitor_singlestep_on = False
    inst.domain.intercepts.singlestep = False
    return VMI_SUCCESS


FUNCTIONS = {
    "vmi_slat_get_domain_state": vmi_slat_get_domain_state,
    "vmi_slat_set_domain_state": vmi_slat_set_domain_state,
    "vmi_slat_create": vmi_slat_create, "vmi_slat_destroy": vmi_slat_destroy,
    "vmi_slat_switch": vmi_slat_switch, "vmi_slat_change_gfn": vmi_slat_change_gfn,
}
# Exported by the .so but absent from the wheel's cdef: the ABI-mode names a driver dlopens.
EXTRA_FUNCTIONS = {
    "vmi_set_mem_event": vmi_set_mem_event, "vmi_alloc_gfn": vmi_alloc_gfn,
    "vmi_free_gfn": vmi_free_gfn, "vmi_get_next_available_gfn": vmi_get_next_available_gfn,
    "vmi_slat_control": vmi_slat_set_domain_state, "vmi_slat_state": vmi_slat_get_domain_state,
    "vmi_stop_single_step_vcpu": vmi_stop_single_step_vcpu,
    "vmi_shutdown_single_step": vmi_shutdown_single_step,
}
