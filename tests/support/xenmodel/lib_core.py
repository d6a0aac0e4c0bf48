"""libvmi core calls on the model: init, destroy, domain information, pause.

Each function has the C signature of the libvmi call it stands for (the `ctx` first argument is
bound by `ModelLib`) and returns what the C function returns. Behaviour follows libvmi 8f9b010
(the 3.7.1 wheel's): libvmi/core.c, accessors.c and driver/xen/xen.c; where Xen is involved,
the domain model (domain.py) answers as the hypercall would.
"""

from __future__ import annotations

from tests.support.xenmodel.constants import (
    ERR_DRIVER,
    ERR_NO_CONFIG_ENTRY,
    ERR_NONE,
    ERR_VM_NOT_FOUND,
    VMI_ARCH_X86_64,
    VMI_FAILURE,
    VMI_INIT_DOMAINID,
    VMI_INIT_DOMAINNAME,
    VMI_INIT_EVENTS,
    VMI_OS_UNKNOWN,
    VMI_PM_IA32E,
    VMI_PM_UNKNOWN,
    VMI_SUCCESS,
    VMI_XEN,
)
from tests.support.xenmodel.errors import XenError
from tests.support.xenmodel.guest.x86 import PAGE
from tests.support.xenmodel.lib_state import XenEvents, c_int, errprint

INVALID_DOMID = 0xFFFF_FFFF_FFFF_FFFF


# --- init and teardown ----------------------------------------------------------------------------
def _domain_of(ctx, domain, init_flags: int):
    """set_id_and_name: a name (char *) or, with VMI_INIT_DOMAINID, a uint64_t read from the
    same pointer -- the wheel passes `domain.encode()` there (bug 1 in the notes), so the id is
    the first bytes of the string."""
    data = domain if isinstance(domain, bytes) else ctx.ffi.string(domain)
    if init_flags & VMI_INIT_DOMAINNAME and init_flags & VMI_INIT_DOMAINID:
        return None
    if init_flags & VMI_INIT_DOMAINID:
        return ctx.host.by_id(int.from_bytes((data + b"\0").ljust(8, b"\0")[:8], "little"))
    if init_flags & VMI_INIT_DOMAINNAME:
        return ctx.host.by_name(data.decode(errors="replace"))
    return None


def vmi_get_access_mode(ctx, vmi, domain, init_flags, init_data, mode) -> int:
    if vmi:
        inst = ctx.instance(vmi)
        mode[0] = inst.mode if inst else VMI_XEN
        return VMI_SUCCESS
    if _domain_of(ctx, domain, c_int(init_flags)) is None:
        return VMI_FAILURE  # no hypervisor driver finds it (driver_init_mode)
    mode[0] = VMI_XEN
    return VMI_SUCCESS


def vmi_init(ctx, vmi_out, mode, domain, init_flags, init_data, error) -> int:
    mode, init_flags = c_int(mode, 32), c_int(init_flags)
    vmi_out[0] = ctx.ffi.NULL
    if mode != VMI_XEN:
        errprint("the model only provides the Xen driver")
        return _fail(error, ERR_DRIVER)
    target = _domain_of(ctx, domain, init_flags)
    if target is None:
        return _fail(error, ERR_VM_NOT_FOUND)
    inst = ctx.new_instance(target, init_flags, mode)
    if init_flags & VMI_INIT_EVENTS:
        try:
            target.monitor_enable()  # xen_init_events: xc_monitor_enable
        except XenError as exc:
            errprint(f"xc_monitor_enable failed: {exc} (vm_event is (or was) active)")
            ctx.forget(inst)
            return _fail(error, ERR_DRIVER)
        inst.xen = XenEvents()
    inst.max_physical_address = (target.p2m.max_gfn() + 1) * PAGE
    vmi_out[0] = inst.handle
    if error:
        error[0] = ERR_NONE
    return VMI_SUCCESS


def vmi_init_complete(ctx, vmi_out, domain, init_flags, init_data, config_mode, config,
                      error) -> int:
    """Full init needs an OS profile (vmi_init_os); the model has none, like a host without a
    libvmi.conf entry for the domain: the instance is torn down and NO_CONFIG_ENTRY reported."""
    status = vmi_init(ctx, vmi_out, VMI_XEN, domain, init_flags, init_data, error)
    if status != VMI_SUCCESS:
        return status
    inst = ctx.instance(vmi_out[0])
    vmi_init_paging(ctx, vmi_out[0], 0)
    vmi_destroy(ctx, inst.handle)
    vmi_out[0] = ctx.ffi.NULL
    return _fail(error, ERR_NO_CONFIG_ENTRY)


def vmi_init_paging(ctx, vmi, flags) -> int:
    inst = ctx.instance(vmi)
    if inst is None:
        return VMI_PM_UNKNOWN
    cpu = inst.domain.vcpu(0)
    long_mode = cpu.reg("cr0") >> 31 & 1 and cpu.reg("msr_efer") >> 10 & 1
    inst.page_mode = VMI_PM_IA32E if long_mode else VMI_PM_UNKNOWN
    return inst.page_mode


def vmi_init_os(ctx, vmi, config_mode, config, error) -> int:
    _fail(error, ERR_NO_CONFIG_ENTRY)
    return VMI_OS_UNKNOWN


def vmi_destroy(ctx, vmi) -> int:
    """vmi_destroy -> xen_events_destroy: pause unless paused, drain the ring, reset host access
    to rwx if mem events were used, turn every monitor off, disable the ring, resume. Views,
    remappings and allocated frames are NOT touched (libvmi leaves them to the caller)."""
    inst = ctx.instance(vmi)
    if inst is None:
        return VMI_FAILURE
    inst.shutting_down = True
    domain = inst.domain
    if inst.events:
        paused_here = not domain.paused
        if paused_here:
            domain.pause()
        ctx.call("vmi_events_listen", inst.handle, 0)
        if inst.mem_events_on_gfn or inst.mem_events_generic:
            domain.p2m.reset_host_perms(domain.p2m.host_default)
            domain.machine.flush_tlb()
        domain.monitor_disable()
        if paused_here:
            domain.unpause()
    ctx.forget(inst)
    return VMI_SUCCESS


def _fail(error, code: int) -> int:
    if error:
        error[0] = code
    return VMI_FAILURE


# --- information ----------------------------------------------------------------------------------
def vmi_get_library_arch(ctx) -> int:
    return VMI_ARCH_X86_64


def vmi_get_name(ctx, vmi):
    inst = ctx.instance(vmi)
    if inst is None:
        return ctx.ffi.NULL
    name = ctx.ffi.new("char[]", inst.domain.name.encode())
    inst.keepalive.append(name)
    return name


def vmi_get_vmid(ctx, vmi) -> int:
    inst = ctx.instance(vmi)
    return inst.domain.domid if inst else INVALID_DOMID


def vmi_get_page_mode(ctx, vmi, vcpu) -> int:
    inst = ctx.instance(vmi)
    return inst.page_mode if inst else VMI_PM_UNKNOWN


def vmi_get_address_width(ctx, vmi) -> int:
    inst = ctx.instance(vmi)
    return 8 if inst and inst.page_mode == VMI_PM_IA32E else 0


def vmi_get_ostype(ctx, vmi) -> int:
    return VMI_OS_UNKNOWN


def vmi_get_memsize(ctx, vmi) -> int:
    inst = ctx.instance(vmi)
    return inst.domain.tot_pages() * PAGE if inst else 0


def vmi_get_max_physical_address(ctx, vmi) -> int:
    """xen_get_memsize refreshes from xc_domain_maximum_gpfn: (max_gpfn + 1) << 12."""
    inst = ctx.instance(vmi)
    if inst is None:
        return 0
    inst.max_physical_address = (inst.domain.p2m.max_gfn() + 1) * PAGE
    return inst.max_physical_address


def vmi_get_num_vcpus(ctx, vmi) -> int:
    inst = ctx.instance(vmi)
    return len(inst.domain.vcpus) if inst else 0


# --- pause ------------------------------------------------------------------------------------------
def vmi_pause_vm(ctx, vmi) -> int:
    return _hypercall(ctx, vmi, lambda inst: inst.domain.pause())


def vmi_resume_vm(ctx, vmi) -> int:
    return _hypercall(ctx, vmi, lambda inst: inst.domain.unpause())


def _hypercall(ctx, vmi, action) -> int:
    inst = ctx.instance(vmi)
    if inst is None:
        return VMI_FAILURE
    try:
        action(inst)
    except XenError as exc:
        errprint(str(exc))
        return VMI_FAILURE
    return VMI_SUCCESS


FUNCTIONS = {
    "vmi_get_access_mode": vmi_get_access_mode, "vmi_init": vmi_init,
    "vmi_init_complete": vmi_init_complete, "vmi_init_paging": vmi_init_paging,
    "vmi_init_os": vmi_init_os, "vmi_destroy": vmi_destroy,
    "vmi_get_library_arch": vmi_get_library_arch, "vmi_get_name": vmi_get_name,
    "vmi_get_vmid": vmi_get_vmid, "vmi_get_page_mode": vmi_get_page_mode,
    "vmi_get_address_width": vmi_get_address_width, "vmi_get_ostype": vmi_get_ostype,
    "vmi_get_memsize": vmi_get_memsize,
    "vmi_get_max_physical_address": vmi_get_max_physical_address,
    "vmi_get_num_vcpus": vmi_get_num_vcpus, "vmi_pause_vm": vmi_pause_vm,
    "vmi_resume_vm": vmi_resume_vm,
}
