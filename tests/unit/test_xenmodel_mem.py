"""EPT violations (MemEvent): the event comes before the access completes; responses steer it."""

from __future__ import annotations

import pytest

from tests.support.xenmodel.guest.image import DATA_GFN, JIT_GFN
from tests.support.xenmodel.testing import Response, attach

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def qword(s, pa: int) -> int:
    return int.from_bytes(s.vmi.read_pa(pa, 8)[0], "little")


def test_write_event_comes_before_the_write_and_emulate_completes_it():
    s = attach(vcpus=1)
    seen = []

    def on_write(vmi, event):
        pa = (event.gfn << 12) + event.offset
        seen.append((event.out_access, event.gla_valid, event.gla, pa, qword(s, pa)))
        return s.E.EventResponse.EMULATE

    s.vmi.register_event(s.E.MemEvent(s.E.MemAccess.W, on_write, gfn=DATA_GFN))
    s.listen_until(lambda: len(seen) >= 6)
    s.vmi.pause_vm()
    s.vmi.listen(0)
    iterations = s.sym("iterations")
    for access, valid, gla, pa, _ in seen:
        assert access == s.E.MemAccess.W and valid
        assert gla & 0xFFF == pa & 0xFFF and pa >> 12 == DATA_GFN
        assert (gla == iterations.va) == (pa == iterations.pa)
    # the same counter trapped twice: the first write had landed (+1) only after the event
    values = [before for *_, pa, before in seen if pa == iterations.pa]
    assert len(values) >= 2 and values[1] == values[0] + 1


def test_emulate_nowrite_discards_the_write():
    s = attach(vcpus=1)
    iterations = s.sym("iterations").pa
    start = qword(s, iterations)
    hits = []

    def on_write(vmi, event):
        hits.append((event.gfn << 12) + event.offset)
        return s.E.EventResponse.EMULATE_NOWRITE

    s.vmi.register_event(s.E.MemEvent(s.E.MemAccess.W, on_write, gfn=DATA_GFN))
    s.listen_until(lambda: hits.count(iterations) >= 3)
    assert qword(s, iterations) == start


def test_execute_event_on_a_written_page_then_lifting_it():
    """The basis of catching written-then-executed code: an X trap on the JIT page fires on
    the first fetch after the guest wrote it, at its first instruction."""
    s = attach(vcpus=1, jit=1)
    fetches = []
    event = None

    def on_fetch(vmi, ev):
        fetches.append((ev.out_access, ev.gla, ev.x86_regs.rip, s.domain.read_u64("jit_seq")))
        vmi.clear_event(event)  # deferred to the end of this listen
        return s.E.EventResponse.NONE

    event = s.E.MemEvent(s.E.MemAccess.X, on_fetch, gfn=JIT_GFN)
    s.vmi.register_event(event)
    s.listen_until(lambda: fetches)
    jit_va = s.sym("jit_seq").va - s.sym("jit_seq").pa + JIT_GFN * 4096
    access, gla, rip, seq = fetches[0]
    assert access == s.E.MemAccess.X and gla == rip == jit_va and seq == 1
    s.listen_until(lambda: s.domain.read_u64("jit_result") >= 3)
    assert len(fetches) == 1  # cleared: the page runs freely again


def test_slat_id_response_moves_the_vcpu_to_an_unrestricted_view():
    s = attach(vcpus=1)
    lib = s.binding.lib
    assert lib.vmi_slat_set_domain_state(s.vmi.vmi, True) == 0
    view = s.vmi.slat_create()
    moved = []

    def on_fetch(vmi, event):
        moved.append(event.slat_id)
        event.cffi_event.slat_id = 0  # notes, bug 8: the view travels in the cffi struct
        return s.E.EventResponse.SLAT_ID

    text_gfn = s.sym("func").pa >> 12
    s.vmi.register_event(s.E.MemEvent(s.E.MemAccess.X, on_fetch, gfn=text_gfn, slat_id=view))
    s.vmi.slat_switch(view)
    before = s.domain.read_u64("func_calls", 0)
    s.listen_until(lambda: s.domain.read_u64("func_calls", 0) > before + 3)
    assert moved == [view]
    assert s.domain.views_in_use() == {0: 0}


def test_generic_handler_with_vmi_set_mem_event():
    """The DRAKVUF style: one generic handler, per-page access through vmi_set_mem_event
    (an export the wheel's cdef lacks, reached through the binding's `extra`)."""
    s = attach(vcpus=1)
    seen = []

    def on_access(vmi, event):
        seen.append((event.gfn, event.out_access))
        s.binding.extra.vmi_set_mem_event(vmi.vmi, event.gfn, s.E.MemAccess.N.value, 0)
        return Response(s.E.EventResponse.NONE)

    s.vmi.register_event(s.E.MemEvent(s.E.MemAccess.W, on_access, generic=True))
    assert s.binding.extra.vmi_set_mem_event(s.vmi.vmi, DATA_GFN, s.E.MemAccess.W.value, 0) == 0
    s.listen_until(lambda: seen)
    assert seen == [(DATA_GFN, s.E.MemAccess.W)]
    before = s.domain.read_u64("iterations", 0)
    s.vmi.listen(50)
    assert s.domain.read_u64("iterations", 0) > before and len(seen) == 1
