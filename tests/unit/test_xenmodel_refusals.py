"""What Xen and libvmi refuse, the model refuses the same way (see lib_events.py, p2m.py)."""

from __future__ import annotations

import pytest

from tests.support.xenmodel.guest.image import DATA_GFN, JIT_GFN
from tests.support.xenmodel.testing import attach

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def noop(vmi, event):
    return None


def test_generic_and_per_gfn_memory_events_do_not_mix():
    s = attach(vcpus=1)
    E = s.E
    s.vmi.register_event(E.MemEvent(E.MemAccess.W, noop, gfn=DATA_GFN))
    with pytest.raises(s.L.LibvmiError):
        s.vmi.register_event(E.MemEvent(E.MemAccess.X, noop, generic=True))
    other = attach(vcpus=1)  # its own binding: its own copies of the classes
    other.vmi.register_event(other.E.MemEvent(other.E.MemAccess.X, noop, generic=True))
    with pytest.raises(other.L.LibvmiError):
        other.vmi.register_event(other.E.MemEvent(other.E.MemAccess.W, noop, gfn=DATA_GFN))


def test_one_per_gfn_event_per_gfn_whatever_the_view():
    s = attach(vcpus=1)
    assert s.binding.lib.vmi_slat_set_domain_state(s.vmi.vmi, True) == 0
    view = s.vmi.slat_create()
    s.vmi.register_event(s.E.MemEvent(s.E.MemAccess.W, noop, gfn=JIT_GFN))
    with pytest.raises(s.L.LibvmiError):
        s.vmi.register_event(s.E.MemEvent(s.E.MemAccess.RW, noop, gfn=JIT_GFN, slat_id=view))


def test_read_only_traps_are_refused_by_the_ept_sanity_check():
    s = attach(vcpus=1)
    for access in (s.E.MemAccess.R, s.E.MemAccess.RX):  # would need write-only EPT entries
        with pytest.raises(s.L.LibvmiError):
            s.vmi.register_event(s.E.MemEvent(access, noop, gfn=DATA_GFN))


def test_set_mem_event_needs_a_generic_handler_for_that_access():
    s = attach(vcpus=1)
    extra, vmi, E = s.binding.extra, s.vmi, s.E
    assert extra.vmi_set_mem_event(vmi.vmi, DATA_GFN, E.MemAccess.W.value, 0) == 1
    vmi.register_event(E.MemEvent(E.MemAccess.X, noop, generic=True))
    assert extra.vmi_set_mem_event(vmi.vmi, DATA_GFN, E.MemAccess.W.value, 0) == 1
    assert extra.vmi_set_mem_event(vmi.vmi, DATA_GFN, E.MemAccess.X.value, 0) == 0
    assert extra.vmi_set_mem_event(vmi.vmi, DATA_GFN, E.MemAccess.N.value, 0) == 0


def test_one_int3_event_and_one_singlestep_event_per_vcpu():
    s = attach(vcpus=2)
    E = s.E
    s.vmi.register_event(E.IntEvent(noop))
    with pytest.raises(s.L.LibvmiError):
        s.vmi.register_event(E.IntEvent(noop))
    s.vmi.register_event(E.SingleStepEvent([1], noop, enable=False))
    with pytest.raises(s.L.LibvmiError):
        s.vmi.register_event(E.SingleStepEvent([0, 1], noop, enable=False))


def test_events_need_init_events():
    s = attach(vcpus=1, events=False)
    with pytest.raises(s.L.LibvmiError):
        s.vmi.register_event(s.E.IntEvent(noop))
    with pytest.raises(s.L.LibvmiError):
        s.vmi.listen(0)


def test_altp2m_refusals():
    s = attach(vcpus=1)
    vmi, lib = s.vmi, s.binding.lib
    with pytest.raises(s.L.LibvmiError):
        vmi.slat_create()  # altp2m not active yet
    assert vmi.slat_get_domain_state() is False
    assert lib.vmi_slat_set_domain_state(vmi.vmi, True) == 0
    view = vmi.slat_create()
    with pytest.raises(s.L.LibvmiError):
        vmi.slat_destroy(0)
    vmi.slat_switch(view)
    with pytest.raises(s.L.LibvmiError):
        vmi.slat_destroy(view)  # a vCPU uses it
    with pytest.raises(s.L.LibvmiError):
        vmi.slat_switch(7)
    with pytest.raises(s.L.LibvmiError):
        vmi.slat_change_gfn(view, JIT_GFN, 0x10_0000)  # new gfn not backed
    vmi.slat_switch(0)
    vmi.slat_destroy(view)
    disabled = attach(vcpus=1, altp2m="disabled")
    with pytest.raises(disabled.L.LibvmiError):
        disabled.vmi.slat_get_domain_state()
    assert disabled.binding.lib.vmi_slat_set_domain_state(disabled.vmi.vmi, True) == 1


def test_clearing_inside_a_callback_waits_for_the_end_of_listen():
    """vmi_clear_event in a callback is only queued, so the gfn is still taken until listen
    ends: registering a replacement from the same callback fails."""
    s = attach(vcpus=1)
    E = s.E
    outcome = []
    first = None

    def on_write(vmi, event):
        if outcome:
            return E.EventResponse.EMULATE
        vmi.clear_event(first)
        try:
            vmi.register_event(E.MemEvent(E.MemAccess.W, noop, gfn=DATA_GFN))
            outcome.append("registered")
        except s.L.LibvmiError:
            outcome.append("refused")
        return E.EventResponse.EMULATE

    first = E.MemEvent(E.MemAccess.W, on_write, gfn=DATA_GFN)
    s.vmi.register_event(first)
    s.listen_until(lambda: outcome)
    assert outcome == ["refused"]
    replacement = E.MemEvent(E.MemAccess.W, lambda vmi, ev: E.EventResponse.EMULATE,
                             gfn=DATA_GFN)
    s.vmi.register_event(replacement)


def test_populating_and_freeing_frames():
    s = attach(vcpus=1)
    extra, vmi = s.binding.extra, s.vmi
    gfn = extra.vmi_get_next_available_gfn(vmi.vmi)
    assert gfn == 0x400
    assert extra.vmi_alloc_gfn(vmi.vmi, gfn) == 0
    assert vmi.get_max_physical_address() == (gfn + 1) << 12
    assert extra.vmi_alloc_gfn(vmi.vmi, gfn) == 1
    vmi.write_pa(gfn << 12, b"shadow")
    assert vmi.read_pa(gfn << 12, 6)[0] == b"shadow"
    assert extra.vmi_free_gfn(vmi.vmi, gfn) == 0
    with pytest.raises(s.L.LibvmiError):
        vmi.read_pa(gfn << 12, 6)
