"""Monitor Trap Flag single-step (SingleStepEvent): exactly one instruction per event."""

from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from tests.support.xenmodel.testing import Response, attach

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def reference_path(s, start: str, count: int) -> list[int]:
    """RIPs after each of the first `count` instructions from `start`, from the code bytes
    (straight-line code, calls and returns only) -- independent of the model's engine."""
    disasm = Cs(CS_ARCH_X86, CS_MODE_64)
    rip, stack, path = s.sym(start).va, [], []
    for _ in range(count):
        pa = s.sym(start).pa + rip - s.sym(start).va
        insn = next(disasm.disasm(s.domain.read_pa(pa, 16), rip))
        if insn.mnemonic == "call":
            stack.append(rip + insn.size)
            rip = int(insn.op_str, 16)
        elif insn.mnemonic == "ret":
            rip = stack.pop()
        else:
            assert not insn.mnemonic.startswith("j"), "reference path must be branch-free"
            rip += insn.size
        path.append(rip)
    return path


def test_each_mtf_event_comes_after_exactly_one_instruction():
    s = attach(vcpus=1)
    steps = []

    def on_step(vmi, event):
        steps.append((event.x86_regs.rip, event.gla, event.offset, event.gfn,
                      event.x86_regs.rflags, s.domain.vcpus[0].retired))

    s.vmi.register_event(s.E.SingleStepEvent([0], on_step))
    s.listen_until(lambda: len(steps) >= 12)
    expected = reference_path(s, "main0", 12)
    assert [step[0] for step in steps[:12]] == expected
    for index, (rip, gla, offset, gfn, rflags, retired) in enumerate(steps[:12]):
        assert gla == rip and offset == rip & 0xFFF and gfn == s.sym("main0").pa >> 12
        assert retired == index + 1
        assert not rflags & 0x100  # no TF: the guest cannot see the stepping
    assert s.domain.read_u64("db_count") == 0


def test_toggle_singlestep_response_steps_into_the_reinjected_handler():
    """With MTF armed, the delivery of a reinjected #BP is the step: the event comes at the
    handler's first instruction, before it runs (Intel SDM vol. 3C, pending MTF VM exits)."""
    s = attach(vcpus=1, int3=1, int3_mask=0)
    landed = []

    def on_int3(vmi, event):
        event.reinject = 1
        return s.E.EventResponse.TOGGLE_SINGLESTEP

    def on_step(vmi, event):
        landed.append((event.x86_regs.rip, s.domain.read_u64("bp_count")))
        return s.E.EventResponse.TOGGLE_SINGLESTEP

    s.vmi.register_event(s.E.SingleStepEvent([0], on_step, enable=False))
    s.vmi.register_event(s.E.IntEvent(on_int3))
    s.listen_until(lambda: len(landed) >= 3)
    handler = s.sym("bp_handler").va
    assert [rip for rip, _ in landed] == [handler] * len(landed)
    assert [count for _, count in landed] == list(range(len(landed)))


def test_toggling_single_step_inside_a_callback_is_refused():
    s = attach(vcpus=1, int3=1, int3_mask=0)
    step = s.E.SingleStepEvent([0], lambda vmi, event: None, enable=False)
    outcome = []

    def on_int3(vmi, event):
        event.reinject = 1
        try:
            vmi.toggle_single_step_vcpu(step, 0, True)
            outcome.append("toggled")
        except s.L.LibvmiError:
            outcome.append("refused")

    s.vmi.register_event(step)
    s.vmi.register_event(s.E.IntEvent(on_int3))
    s.listen_until(lambda: outcome)
    assert outcome[0] == "refused"


def test_toggle_single_step_vcpu_arms_mtf_only_for_an_enabled_event():
    """xen_start_single_step flips MTF only when the event's `enable` is set: toggling a
    dormant event registers it but does not step."""
    s = attach(vcpus=1)
    steps = []
    step = s.E.SingleStepEvent([0], lambda vmi, event: steps.append(event.x86_regs.rip),
                               enable=False)
    s.vmi.register_event(step)
    s.vmi.toggle_single_step_vcpu(step, 0, False)
    s.vmi.toggle_single_step_vcpu(step, 0, True)
    s.vmi.listen(20)
    assert steps == []
    step.enable = True
    s.vmi.toggle_single_step_vcpu(step, 0, False)
    s.vmi.toggle_single_step_vcpu(step, 0, True)
    s.listen_until(lambda: len(steps) >= 3)


def test_stepping_stops_when_the_callback_toggles_it_off():
    s = attach(vcpus=2)
    steps = []

    def on_step(vmi, event):
        steps.append(event.vcpu_id)
        return Response(s.E.EventResponse.TOGGLE_SINGLESTEP)

    s.vmi.register_event(s.E.SingleStepEvent([0, 1], on_step))
    s.vmi.listen(20)
    s.vmi.listen(20)
    assert sorted(steps) == [0, 1]
    assert not any(v.single_step for v in s.domain.vcpus)
