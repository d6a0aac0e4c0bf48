"""CR3 and MSR write intercepts (RegEvent): value, previous, and where the vCPU stands."""

from __future__ import annotations

import pytest

from tests.support.xenmodel.guest.x86 import MSR_LSTAR
from tests.support.xenmodel.testing import attach

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def test_cr3_writes_report_new_and_previous_and_complete_before_the_callback():
    s = attach(vcpus=1, user=1)
    a, b = s.domain.image.cr3_a, s.domain.image.cr3_b
    seen = []

    def on_cr3(vmi, event):
        rip = event.x86_regs.rip
        seen.append((event.previous, event.value, event.x86_regs.cr3,
                     vmi.read_pa(s.sym("user_round").pa + rip - s.sym("user_round").va, 3)[0],
                     vmi.get_vcpureg(s.L.X86Reg.CR3.value, 0)))

    s.vmi.register_event(s.E.RegEvent(s.L.X86Reg.CR3, s.E.RegAccess.W, on_cr3))
    s.listen_until(lambda: len(seen) >= 6)
    assert [(prev, new) for prev, new, *_ in seen[:6]] == [(a, a), (a, b), (b, a)] * 2
    for previous, new, regs_cr3, code, now in seen:
        assert regs_cr3 == previous          # the request's registers: before the write
        assert code == b"\x0f\x22\xd8"       # RIP: at the `mov cr3, rax`
        assert now == new                    # libvmi leaves writes undeferred: done already
    assert s.domain.read_u64("unexpected_count") == 0


def test_onchange_cr3_events_skip_writes_of_the_same_value():
    s = attach(vcpus=1, user=1)
    seen = []
    event = s.E.RegEvent(s.L.X86Reg.CR3, s.E.RegAccess.W,
                         lambda vmi, ev: seen.append((ev.previous, ev.value)))
    event.cffi_event.reg_event.onchange = 1
    s.vmi.register_event(event)
    s.listen_until(lambda: len(seen) >= 4)
    assert all(previous != new for previous, new in seen)


def test_lstar_write_through_msr_any():
    s = attach(vcpus=1, lstar=1, lstar_mask=1)
    seen = []

    def on_msr(vmi, event):
        seen.append((event.msr, event.previous, event.value, event.x86_regs.rip))

    event = s.E.RegEvent(s.L.MSR.ANY, s.E.RegAccess.W, on_msr)
    event.cffi_event.reg_event.msr = MSR_LSTAR  # to_cffi keeps it; MSR_ANY needs the index
    s.vmi.register_event(event)
    s.listen_until(lambda: len(seen) >= 3)
    entry = s.sym("syscall_entry").va
    assert seen[0] == (MSR_LSTAR, 0, entry, s.sym("main0").va + 19)  # the boot-time wrmsr
    assert all(msr == MSR_LSTAR and new == entry for msr, _, new, _ in seen)
    assert seen[1][1] == entry and seen[1][3] == s.sym("rewrite_lstar").va + 19


def test_msr_all_covers_lstar():
    s = attach(vcpus=1)
    seen = []
    s.vmi.register_event(s.E.RegEvent(s.L.MSR.ALL, s.E.RegAccess.W,
                                      lambda vmi, ev: seen.append((ev.msr, ev.value))))
    s.listen_until(lambda: seen)
    assert seen[0] == (MSR_LSTAR, s.sym("syscall_entry").va)


def test_register_events_xen_cannot_provide_are_refused():
    s = attach(vcpus=1)
    L, E = s.L, s.E
    for register, access in ((L.X86Reg.CR3, E.RegAccess.R), (L.X86Reg.CR3, E.RegAccess.RW),
                             (L.MSR.LSTAR, E.RegAccess.W),   # "use MSR_ANY"
                             (L.X86Reg.RIP, E.RegAccess.W),
                             (L.MSR.ANY, E.RegAccess.W)):     # MSR_ANY without an index
        with pytest.raises(L.LibvmiError):
            s.vmi.register_event(E.RegEvent(register, access, lambda vmi, ev: None))
    s.vmi.register_event(E.RegEvent(L.X86Reg.CR3, E.RegAccess.W, lambda vmi, ev: None))
    with pytest.raises(L.LibvmiError):  # one event per register
        s.vmi.register_event(E.RegEvent(L.X86Reg.CR3, E.RegAccess.W, lambda vmi, ev: None))


def test_deny_does_not_stop_a_cr3_write():
    """DENY cancels only deferred writes, and libvmi never asks Xen to defer them."""
    s = attach(vcpus=1, user=1)
    b = s.domain.image.cr3_b
    after = []

    def on_cr3(vmi, event):
        if event.value == b:
            after.append(vmi.get_vcpureg(s.L.X86Reg.CR3.value, 0))
        return s.E.EventResponse.DENY

    s.vmi.register_event(s.E.RegEvent(s.L.X86Reg.CR3, s.E.RegAccess.W, on_cr3))
    rounds = s.domain.read_u64("user_rounds")
    s.listen_until(lambda: s.domain.read_u64("user_rounds") > rounds + 1)
    assert after and all(cr3 == b for cr3 in after)
    data_b = s.domain.image.sym("user_data_b").pa
    assert int.from_bytes(s.domain.read_pa(data_b, 8), "little") > 0  # space B did run
