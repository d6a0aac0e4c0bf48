"""libvmi core calls on the model: init, destroy, registers, physical memory, pause.

Each function has the C signature of the libvmi call it stands for (the `ctx` first argument is
bound by `ModelLib`) and returns what the C function returns. Behaviour follows libvmi 3.7.1's
libvmi/core.c, accessors.c and driver/xen/xen.c; where Xen is involved, the domain model
(domain.py) answers as the hypercall would.
"""

from __future__ import annotations

import struct

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
from tests.support.xenmodel.errors import NotModelled, XenError
from tests.support.xenmodel.guest.x86 import PAGE
from tests.support.xenmodel.lib_state import Instance, XenEvents, c_int, errprint
from tests.support.xenmodel.paging import Access, walk

INVALID_DOMID = 0xFFFF_FFFF_FFFF_FFFF

# reg_t ids of libvmi.h -> model register names (None: 64-bit segment values the model returns).
REG_IDS: dict[int, str] = {
    0: "rax", 1: "rbx", 2: "rcx", 3: "rdx", 4: "rbp", 5: "rsi", 6: "rdi", 7: "rsp",
    8: "rip", 9: "rflags", 10: "r8", 11: "r9", 12: "r10", 13: "r11", 14: "r12", 15: "r13",
    16: "r14", 17: "r15", 18: "cr0", 19: "cr2", 20: "cr3", 21: "cr4",
    23: "dr0", 24: "dr1", 25: "dr2", 26: "dr3", 27: "dr6", 28: "dr7",
    29: "cs_sel", 30: "ds_sel", 31: "es_sel", 32: "fs_sel", 33: "gs_sel", 34: "ss_sel",
    35: "tr_sel", 36: "ldtr_sel", 45: "idtr_limit", 46: "gdtr_limit", 43: "tr_limit",
    44: "ldtr_limit", 50: "fs_base", 51: "gs_base", 53: "tr_base", 54: "ldtr_base",
    55: "idtr_base", 56: "gdtr_base", 65: "sysenter_cs", 66: "sysenter_esp",
    67: "sysenter_eip", 68: "shadow_gs", 71: "msr_lstar", 72: "msr_cstar",
    73: "msr_syscall_mask", 74: "msr_efer", 119: "msr_star",
}
FLAT_SEGMENT_IDS = {37: "limit", 38: "limit", 39: "limit", 42: "limit",   # CS/DS/ES/SS_LIMIT
                    47: "base", 48: "base", 49: "base", 52: "base"}       # CS/DS/ES/SS_BASE
ARBYTES_IDS = {57: "cs_sel", 58: "ds_sel", 59: "es_sel", 60: "fs_sel", 61: "gs_sel",
               62: "ss_sel"}
# registers_t.x86 fields in the wheel's cdef, and which of them xen_set_vcpuregs_hvm writes.
CDEF_X86_FIELDS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10",
                   "r11", "r12", "r13", "r14", "r15", "rflags", "dr7", "rip", "cr0", "cr2",
                   "cr3", "cr4", "sysenter_cs", "sysenter_esp", "sysenter_eip", "msr_efer",
                   "msr_star", "msr_lstar", "fs_base", "gs_base", "cs_arbytes")
MODE_BITS = {"cr0": (1 << 0) | (1 << 31), "cr4": 1 << 5, "msr_efer": (1 << 8) | (1 << 10)}


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


# --- registers ----------------------------------------------------------------------------------
def _vcpu(inst: Instance | None, vcpu):
    if inst is None:
        return None
    number = c_int(vcpu, 64, what="unsigned long")
    return inst.domain.vcpus[number] if number < len(inst.domain.vcpus) else None


def vmi_get_vcpureg(ctx, vmi, value, reg, vcpu) -> int:
    cpu = _vcpu(ctx.instance(vmi), vcpu)
    reg = c_int(reg, what="reg_t")
    if cpu is None:
        return VMI_FAILURE
    if reg in REG_IDS:
        value[0] = cpu.reg(REG_IDS[reg])
    elif reg in FLAT_SEGMENT_IDS:
        value[0] = 0xFFFF_FFFF if FLAT_SEGMENT_IDS[reg] == "limit" else 0
    elif reg in ARBYTES_IDS:
        value[0] = _arbytes(cpu, cpu.reg(ARBYTES_IDS[reg]))
    else:
        errprint(f"xen_get_vcpureg_hvm: register {reg} is not modelled")
        return VMI_FAILURE
    return VMI_SUCCESS


def vmi_set_vcpureg(ctx, vmi, value, reg, vcpu) -> int:
    inst = ctx.instance(vmi)
    cpu = _vcpu(inst, vcpu)
    value, reg = c_int(value, what="reg_t"), c_int(reg, what="reg_t")
    if cpu is None or reg not in REG_IDS:
        return VMI_FAILURE
    name = REG_IDS[reg]
    _check_mode_bits(cpu, {name: value})
    inst.domain.pause()  # xen_set_vcpureg_hvm pauses around get/setcontext
    try:
        cpu.set_reg(name, value)
    finally:
        inst.domain.unpause()
    return VMI_SUCCESS


def vmi_get_vcpuregs(ctx, vmi, regs, vcpu) -> int:
    cpu = _vcpu(ctx.instance(vmi), vcpu)
    if cpu is None or not regs:
        return VMI_FAILURE
    fill_x86_regs(regs.x86, cpu)
    return VMI_SUCCESS


def vmi_set_vcpuregs(ctx, vmi, regs, vcpu) -> int:
    inst = ctx.instance(vmi)
    cpu = _vcpu(inst, vcpu)
    if cpu is None or not regs:
        return VMI_FAILURE
    new = {name: getattr(regs.x86, name) for name in CDEF_X86_FIELDS}
    if new["cs_arbytes"] != _arbytes(cpu, cpu.reg("cs_sel")):
        raise NotModelled("set_vcpuregs changing CS attributes (a partly filled registers_t?)")
    _check_mode_bits(cpu, new)
    inst.domain.pause()
    try:
        for name, value in new.items():
            if name != "cs_arbytes" and cpu.reg(name) != value:
                cpu.set_reg(name, value)
    finally:
        inst.domain.unpause()
    return VMI_SUCCESS


def fill_x86_regs(x86, cpu) -> None:
    """registers_t.x86 as xen_get_vcpuregs_hvm fills it (the fields the wheel's cdef names)."""
    for name in CDEF_X86_FIELDS[:-1]:
        setattr(x86, name, cpu.reg(name))
    x86.cs_arbytes = _arbytes(cpu, cpu.reg("cs_sel"))


def _check_mode_bits(cpu, new: dict[str, int]) -> None:
    for name, bits in MODE_BITS.items():
        if name in new and (new[name] ^ cpu.reg(name)) & bits:
            raise NotModelled(f"changing the paging mode through {name}")


def _arbytes(cpu, selector: int) -> int:
    """Xen's packed segment attributes: access byte, then the G/DB/L/AVL nibble."""
    if selector & ~3 == 0:
        return 0
    raw = cpu.read_virt(cpu.reg("gdtr_base") + (selector & ~7), 8)
    descriptor = struct.unpack("<Q", raw)[0]
    return (descriptor >> 40) & 0xFF | ((descriptor >> 52) & 0xF) << 8


# --- physical memory ----------------------------------------------------------------------------
def vmi_read_pa(ctx, vmi, paddr, count, buffer, bytes_read) -> int:
    """Reads go through foreign mappings of the host p2m, page by page; a missing page stops."""
    inst = ctx.instance(vmi)
    paddr, count = c_int(paddr, what="addr_t"), c_int(count, what="size_t")
    done = 0
    while inst is not None and done < count:
        n = min(count - done, PAGE - ((paddr + done) & (PAGE - 1)))
        try:
            data = inst.domain.read_pa(paddr + done, n)
        except XenError:
            break
        ctx.ffi.memmove(buffer + done, data, n)
        done += n
    if bytes_read:
        bytes_read[0] = done
    return VMI_SUCCESS if inst is not None and done == count else VMI_FAILURE


def vmi_write_pa(ctx, vmi, paddr, count, buffer, bytes_written) -> int:
    inst = ctx.instance(vmi)
    paddr, count = c_int(paddr, what="addr_t"), c_int(count, what="size_t")
    data = bytes(ctx.ffi.buffer(buffer, count))
    done = 0
    while inst is not None and done < count:
        n = min(count - done, PAGE - ((paddr + done) & (PAGE - 1)))
        try:
            inst.domain.write_pa(paddr + done, data[done:done + n])
        except XenError:
            break
        done += n
    if bytes_written:
        bytes_written[0] = done
    return VMI_SUCCESS if inst is not None and done == count else VMI_FAILURE


def _sized_read(size: int):
    def read(ctx, vmi, paddr, value) -> int:
        buf = ctx.ffi.new("char[]", size)
        status = vmi_read_pa(ctx, vmi, paddr, size, buf, ctx.ffi.NULL)
        if status == VMI_SUCCESS:
            value[0] = int.from_bytes(ctx.ffi.buffer(buf, size), "little")
        return status
    return read


def _sized_write(size: int):
    def write(ctx, vmi, paddr, value) -> int:
        data = int(value[0]).to_bytes(size, "little")
        return vmi_write_pa(ctx, vmi, paddr, size, ctx.ffi.from_buffer(data), ctx.ffi.NULL)
    return write


def vmi_pagetable_lookup(ctx, vmi, dtb, vaddr, paddr) -> int:
    """libvmi's own walk of `dtb` (supervisor access through the host p2m)."""
    inst = ctx.instance(vmi)
    if inst is None:
        return VMI_FAILURE
    domain = inst.domain

    def read_qword(gpa: int) -> int:
        return int.from_bytes(domain.read_pa(gpa, 8), "little")
    try:
        result = walk(read_qword, c_int(dtb), c_int(vaddr), Access.READ, cpl=0, wp=False,
                      nxe=True)
    except XenError:
        return VMI_FAILURE
    if not hasattr(result, "gpa"):
        return VMI_FAILURE
    paddr[0] = result.gpa
    return VMI_SUCCESS


def _no_os(ctx, *args) -> int:
    """Translations needing the OS (kernel page tables, symbols, pids): no OS init, no answer."""
    return VMI_FAILURE


def _noop(ctx, *args) -> None:
    return None


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
    "vmi_resume_vm": vmi_resume_vm, "vmi_get_vcpureg": vmi_get_vcpureg,
    "vmi_set_vcpureg": vmi_set_vcpureg, "vmi_get_vcpuregs": vmi_get_vcpuregs,
    "vmi_set_vcpuregs": vmi_set_vcpuregs, "vmi_read_pa": vmi_read_pa,
    "vmi_write_pa": vmi_write_pa, "vmi_pagetable_lookup": vmi_pagetable_lookup,
    "vmi_translate_kv2p": _no_os, "vmi_translate_uv2p": _no_os, "vmi_translate_ksym2v": _no_os,
    "vmi_pid_to_dtb": _no_os, "vmi_dtb_to_pid": _no_os, "vmi_get_offset": _no_os,
    "vmi_v2pcache_flush": _noop, "vmi_v2pcache_add": _noop, "vmi_symcache_flush": _noop,
    "vmi_symcache_add": _noop, "vmi_rvacache_flush": _noop, "vmi_rvacache_add": _noop,
    "vmi_pidcache_flush": _noop, "vmi_pidcache_add": _noop, "vmi_pagecache_flush": _noop,
}
for _bits, _size in ((8, 1), (16, 2), (32, 4), (64, 8)):
    FUNCTIONS[f"vmi_read_{_bits}_pa"] = _sized_read(_size)
    FUNCTIONS[f"vmi_write_{_bits}_pa"] = _sized_write(_size)
FUNCTIONS["vmi_read_addr_pa"] = _sized_read(8)
FUNCTIONS["vmi_write_addr_pa"] = _sized_write(8)
