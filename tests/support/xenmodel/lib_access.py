"""libvmi calls that read and write the guest: vCPU registers and physical memory.

Behaviour follows libvmi 8f9b010's accessors.c and driver/xen/xen.c (xen_get_vcpureg_hvm,
xen_get_vcpuregs_hvm, xen_set_vcpuregs_hvm, xen_read_page/xen_write): registers come from the
HVM context of one vCPU, memory through foreign mappings of the host p2m, so what a read shows
never depends on a vCPU's altp2m view.
"""

from __future__ import annotations

import struct

from tests.support.xenmodel.constants import VMI_FAILURE, VMI_SUCCESS
from tests.support.xenmodel.errors import NotModelled, XenError
from tests.support.xenmodel.guest.x86 import PAGE
from tests.support.xenmodel.lib_state import Instance, c_int, errprint
from tests.support.xenmodel.paging import Access, walk

# reg_t ids of libvmi.h -> model register names; flat 64-bit segments have fixed base/limit.
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
    "vmi_get_vcpureg": vmi_get_vcpureg, "vmi_set_vcpureg": vmi_set_vcpureg,
    "vmi_get_vcpuregs": vmi_get_vcpuregs, "vmi_set_vcpuregs": vmi_set_vcpuregs,
    "vmi_read_pa": vmi_read_pa, "vmi_write_pa": vmi_write_pa,
    "vmi_pagetable_lookup": vmi_pagetable_lookup,
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
