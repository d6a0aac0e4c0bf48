"""The model binding is the real libvmi Python API: same sources, names, signatures and bugs."""

from __future__ import annotations

import inspect

import pytest

from tests.support.xenmodel import XenHost, build_demo_image, model_binding, real_binding
from tests.support.xenmodel.binding import EXTRA_CDEF
from tests.support.xenmodel.testing import attach

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def test_model_binding_runs_the_installed_package_sources():
    real, model = real_binding(), model_binding(XenHost())
    assert inspect.getsourcefile(model.libvmi.Libvmi) == inspect.getsourcefile(real.libvmi.Libvmi)
    assert inspect.getsourcefile(model.event.MemEvent) == inspect.getsourcefile(
        real.event.MemEvent)
    for name in ("Libvmi", "X86Reg", "MSR", "VMIMode", "PageMode", "LibvmiError", "Registers",
                 "INIT_DOMAINNAME", "INIT_EVENTS"):
        assert hasattr(model.libvmi, name) and hasattr(real.libvmi, name)
    for name in ("IntEvent", "SingleStepEvent", "MemEvent", "RegEvent", "DebugEvent",
                 "EventResponse", "MemAccess", "RegAccess", "InterruptType"):
        assert getattr(model.event, name).__name__ == getattr(real.event, name).__name__
    assert real.libvmi.Libvmi is not model.libvmi.Libvmi  # the real package is left alone
    assert [m.value for m in model.event.EventResponse] == [m.value for m in
                                                            real.event.EventResponse]


def test_both_bindings_offer_the_exports_the_cdef_lacks():
    real, model = real_binding(), model_binding(XenHost())
    names = [line.split("(")[0].split()[-1].lstrip("*") for line in EXTRA_CDEF.strip().splitlines()]
    for name in names:
        assert callable(getattr(real.extra, name))
        assert callable(getattr(model.extra, name))
    assert real.extra.vmi_get_next_available_gfn(real.ffi.NULL) == 0  # the real .so, callable


def test_partial_init_reports_the_domain():
    s = attach()
    vmi, L = s.vmi, s.L
    assert vmi.get_page_mode(0) == L.PageMode.IA32E
    assert vmi.get_num_vcpus() == 2
    assert vmi.get_name() == "guest" and vmi.get_vmid() == s.domain.domid
    assert vmi.get_memsize() == 0x400 * 4096
    assert vmi.get_max_physical_address() == 0x400 * 4096
    assert s.domain.monitor_enabled


def test_full_init_fails_without_an_os_profile_and_leaves_no_monitor():
    host = XenHost()
    domain = host.create_domain("guest", build_demo_image())
    L = model_binding(host).libvmi
    with pytest.raises(L.LibvmiError, match="NO_CONFIG_ENTRY"):
        L.Libvmi("guest", L.INIT_DOMAINNAME | L.INIT_EVENTS)
    assert not domain.monitor_enabled


def test_unknown_domain_and_domain_id_init_fail():
    host = XenHost()
    host.create_domain("guest", build_demo_image())
    L = model_binding(host).libvmi
    with pytest.raises(L.LibvmiError, match="VM_NOT_FOUND"):
        L.Libvmi("other", L.INIT_DOMAINNAME, mode=L.VMIMode.XEN, partial=True)
    # Bug 1: INIT_DOMAINID hands libvmi `"1".encode()`, read as a uint64 -- never domain 1.
    with pytest.raises(L.LibvmiError, match="VM_NOT_FOUND"):
        L.Libvmi("1", L.INIT_DOMAINID, mode=L.VMIMode.XEN, partial=True)


def test_one_monitor_ring_per_domain():
    s = attach()
    with pytest.raises(s.L.LibvmiError, match="DRIVER"):
        s.L.Libvmi("guest", s.L.INIT_DOMAINNAME | s.L.INIT_EVENTS, mode=s.L.VMIMode.XEN,
                   partial=True)
    s.vmi.destroy()
    again = s.L.Libvmi("guest", s.L.INIT_DOMAINNAME | s.L.INIT_EVENTS, mode=s.L.VMIMode.XEN,
                       partial=True)
    again.destroy()


def test_registers_round_trip_and_raw_ids():
    s = attach()
    vmi, L = s.vmi, s.L
    regs = vmi.get_vcpuregs(1)
    assert regs[L.X86Reg.RIP] == s.sym("main1").va
    assert regs[L.X86Reg.R15] == 1 and regs[L.X86Reg.CR3] == s.domain.image.cr3_a
    assert regs.cffi_regs.x86.cs_arbytes == 0xA9B  # 64-bit ring-0 code: Xen's packed format
    regs[L.X86Reg.RAX] = 0x1122334455667788
    vmi.set_vcpuregs(regs, 1)
    assert vmi.get_vcpureg(L.X86Reg.RAX.value, 1) == 0x1122334455667788
    assert vmi.get_vcpureg(29, 0) == 0x10          # CS_SEL (not in X86Reg)
    assert vmi.get_vcpureg(56, 0) == s.domain.image.vcpus[0].gdt[0]  # GDTR_BASE
    assert vmi.get_vcpureg(50, 0) == 0                               # FS_BASE
    assert vmi.get_vcpureg(s.L.MSR.LSTAR.value, 0) == 0
    with pytest.raises(TypeError):  # like cffi: an X86Reg member is not a reg_t
        vmi.get_vcpureg(L.X86Reg.RIP, 0)
    assert s.domain.pause_count == 0  # set_vcpuregs pauses and resumes around setcontext


def test_set_vcpuregs_from_an_empty_registers_object_is_refused():
    s = attach()
    empty = s.L.Registers()
    with pytest.raises(NotImplementedError):
        s.vmi.set_vcpuregs(empty, 0)


def test_physical_memory_reads_writes_and_bounds():
    s = attach()
    vmi, func = s.vmi, s.sym("func")
    data, count = vmi.read_pa(func.pa, 8)
    assert count == 8 and data == s.domain.read_pa(func.pa, 8)
    vmi.write_pa(s.sym("cfg_jit").pa, (1).to_bytes(8, "little"))
    assert s.domain.read_u64("cfg_jit") == 1
    end = vmi.get_max_physical_address()
    with pytest.raises(s.L.LibvmiError):
        vmi.read_pa(end - 4, 8)
    data, count = vmi.read_pa(end - 4, 8, padding=True)
    assert count == 4 and len(data) == 8 and data[4:] == bytes(4)


def test_pause_is_reference_counted():
    s = attach()
    vmi = s.vmi
    vmi.pause_vm()
    vmi.pause_vm()
    before = s.domain.read_u64("iterations", 0)
    vmi.listen(50)
    assert s.domain.read_u64("iterations", 0) == before
    vmi.resume_vm()
    vmi.listen(50)
    assert s.domain.read_u64("iterations", 0) == before
    vmi.resume_vm()
    vmi.listen(50)
    assert s.domain.read_u64("iterations", 0) > before
    with pytest.raises(s.L.LibvmiError):
        vmi.resume_vm()


def test_destroy_leaves_the_domain_running_and_unmonitored():
    s = attach(checksum=1)
    s.vmi.listen(10)
    s.vmi.destroy()
    assert not s.domain.monitor_enabled and s.domain.pause_count == 0
    before = s.domain.read_u64("iterations", 0)
    s.domain.run(5_000)
    assert s.domain.read_u64("iterations", 0) > before


def test_pagetable_lookup_walks_the_given_address_space():
    s = attach(vcpus=1)
    image = s.domain.image
    assert s.vmi.pagetable_lookup(image.cr3_a, s.sym("func").va) == s.sym("func").pa
    assert s.vmi.pagetable_lookup(image.cr3_b, 0x600000) == s.sym("user_data_b").pa
    with pytest.raises(s.L.LibvmiError):
        s.vmi.pagetable_lookup(image.cr3_a, 0x1000)  # not mapped
    with pytest.raises(s.L.LibvmiError):
        s.vmi.translate_kv2p(s.sym("func").va)  # needs OS init, which the model has not
