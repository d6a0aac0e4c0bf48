"""INT3 through the exception bitmap (IntEvent): the event comes before IDT delivery."""

from __future__ import annotations

import pytest

from tests.support.xenmodel.testing import attach

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def test_guest_int3_event_then_reinjection_reaches_the_handler_exactly_once():
    s = attach(vcpus=1, int3=1, int3_mask=3)
    seen = []

    def on_int3(vmi, event):
        interrupt = event.cffi_event.interrupt_event
        seen.append((event.vcpu_id, event.gla, event.gfn, event.offset, interrupt.insn_length,
                     s.domain.read_u64("bp_count"), event.x86_regs.rip))
        event.reinject = 1

    s.vmi.register_event(s.E.IntEvent(on_int3))
    s.listen_until(lambda: len(seen) >= 5)
    int3 = s.sym("guest_int3")
    for index, (vcpu, gla, gfn, offset, length, count, rip) in enumerate(seen):
        assert (vcpu, gla, gfn, offset, length, rip) == (0, int3.va, int3.pa >> 12,
                                                          int3.va & 0xFFF, 1, int3.va)
        assert count == index  # each earlier #BP reached the guest handler once, not twice
    s.vmi.pause_vm()
    s.vmi.listen(0)
    assert s.domain.read_u64("bp_last_rip") == s.sym("after_int3").va


def test_int3_is_swallowed_with_reinject_zero():
    s = attach(vcpus=1, int3=1, int3_mask=0)
    hits = []

    def on_int3(vmi, event):
        hits.append(event.gla)
        event.reinject = 0
        vmi.set_vcpureg(event.gla + 1, s.L.X86Reg.RIP.value, event.vcpu_id)

    s.vmi.register_event(s.E.IntEvent(on_int3))
    s.listen_until(lambda: len(hits) >= 5)
    assert s.domain.read_u64("bp_count") == 0
    assert s.domain.read_u64("iterations", 0) >= 4


def test_a_callback_that_does_not_set_reinject_leaves_the_vcpu_paused_for_good():
    """libvmi: 'Need to specify reinjection behaviour!' -- the request is consumed, never
    answered, and Xen keeps that vCPU paused, even after libvmi detaches."""
    s = attach(vcpus=2, int3=1, int3_mask=0)
    s.vmi.register_event(s.E.IntEvent(lambda vmi, event: None))
    with pytest.raises(s.L.LibvmiError):
        s.listen_until(lambda: False, limit=20)
    assert s.domain.wedged() == [0]
    other = s.domain.read_u64("iterations", 1)
    s.vmi.listen(50)
    assert s.domain.read_u64("iterations", 1) > other  # vCPU1 runs on
    s.vmi.destroy()
    assert s.domain.wedged() == [0]


def test_a_planted_int3_hits_on_both_vcpus_and_the_guest_sees_none():
    s = attach(vcpus=2)
    func = s.sym("func")
    original = s.vmi.read_pa(func.pa, 1)[0]
    hits = {0: 0, 1: 0}

    def on_int3(vmi, event):
        assert event.gla == func.va
        hits[event.vcpu_id] += 1
        event.reinject = 0
        return s.E.EventResponse.NONE

    s.vmi.pause_vm()
    s.vmi.write_pa(func.pa, b"\xcc")
    s.vmi.register_event(s.E.IntEvent(on_int3))
    s.vmi.resume_vm()
    s.listen_until(lambda: hits[0] and hits[1])
    assert s.domain.read_u64("func_calls", 0) == 0 and s.domain.read_u64("func_calls", 1) == 0
    s.vmi.pause_vm()
    s.vmi.write_pa(func.pa, original)  # remove it: both vCPUs re-execute the real instruction
    s.vmi.resume_vm()
    s.listen_until(lambda: s.domain.read_u64("func_calls", 0) and s.domain.read_u64(
        "func_calls", 1))
    assert s.domain.read_u64("bp_count") == 0


def test_debug_exception_event_and_reinjection_to_the_guest_db_handler():
    """A #DB the guest would take (here from a TF the test sets, as a careless debugger would)
    is intercepted first (DebugEvent); reinjected, the guest's handler runs once."""
    s = attach(vcpus=1)
    tf = 0x100
    seen = []

    def on_debug(vmi, event):
        debug = event.cffi_event.debug_event
        seen.append((debug.type, debug.gla, s.domain.read_u64("db_count")))
        rflags = vmi.get_vcpureg(s.L.X86Reg.RFLAGS.value, 0)
        vmi.set_vcpureg(rflags & ~tf, s.L.X86Reg.RFLAGS.value, 0)
        event.reinject = 1

    s.vmi.register_event(s.E.DebugEvent(on_debug))
    s.vmi.pause_vm()
    rflags = s.vmi.get_vcpureg(s.L.X86Reg.RFLAGS.value, 0)
    s.vmi.set_vcpureg(rflags | tf, s.L.X86Reg.RFLAGS.value, 0)
    s.vmi.resume_vm()
    s.listen_until(lambda: s.domain.read_u64("db_count") == 1)
    s.vmi.listen(20)
    assert len(seen) == 1
    kind, gla, count = seen[0]
    assert kind == 3 and gla == s.sym("main0").va + 5 and count == 0  # after one instruction
    assert s.domain.read_u64("db_count") == 1
    assert s.domain.read_u64("db_last_rip") == s.sym("main0").va + 5


def test_set_registers_response_moves_rip_past_the_int3():
    """SET_REGISTERS applies the GPRs, RFLAGS and RIP of the event's x86_regs on resume."""
    s = attach(vcpus=1, int3=1, int3_mask=0)
    hits = []

    def on_int3(vmi, event):
        hits.append(event.gla)
        event.reinject = 0
        event.x86_regs.rip = event.gla + 1
        return s.E.EventResponse.SET_REGISTERS

    s.vmi.register_event(s.E.IntEvent(on_int3))
    s.listen_until(lambda: len(hits) >= 3)
    assert s.domain.read_u64("bp_count") == 0 and s.domain.read_u64("unexpected_count") == 0


def test_a_ring3_int3_reinjected_reaches_the_ring0_handler():
    s = attach(vcpus=1, user=1)
    s.vmi.write_pa(s.sym("user_int3_a").pa, (1).to_bytes(8, "little"))
    seen = []

    def on_int3(vmi, event):
        seen.append((event.gla, vmi.get_vcpureg(29, 0) & 3, s.domain.read_u64("bp_count")))
        event.reinject = 1

    s.vmi.register_event(s.E.IntEvent(on_int3))
    s.listen_until(lambda: len(seen) >= 3)
    user_int3 = s.sym("user_int3").va
    assert [(gla, cpl) for gla, cpl, _ in seen] == [(user_int3, 3)] * len(seen)
    assert [count for *_, count in seen] == list(range(len(seen)))
    assert s.domain.read_u64("bp_last_rip") == user_int3 + 1
    assert s.domain.read_u64("unexpected_count") == 0
