"""Invisible breakpoints with altp2m, done by the test as a driver would (DRAKVUF's scheme).

An execute view maps the code page's gfn to a shadow copy carrying 0xCC; the guest's reads and
writes of that gfn trap in the execute view and are replayed in view 0 for one MTF step; our
INT3 is consumed and the original instruction is stepped in view 0. The guest's checksum of its
own code must never see the 0xCC, and the guest's #BP handler must never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.support.xenmodel.guest.image import JIT_GFN
from tests.support.xenmodel.p2m import Perm
from tests.support.xenmodel.testing import Response, attach

# A callback that raises is only a warning from cffi (it answers 0): make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

INVALID_GFN = 0xFFFF_FFFF_FFFF_FFFF


@dataclass
class ShadowBreakpoints:
    """A minimal driver-side implementation of the scheme (libvmi notes, DRAKVUF vmi.c)."""

    s: object
    view: int = 0
    shadows: dict[int, int] = field(default_factory=dict)      # original gfn -> shadow gfn
    offsets: dict[int, list[int]] = field(default_factory=dict)  # gfn -> breakpoint offsets
    hits: dict[int, int] = field(default_factory=dict)           # vCPU -> our INT3s consumed
    rewrites: int = 0
    events: list = field(default_factory=list)

    def install(self, gfn: int, offset: int) -> None:
        s, vmi, extra = self.s, self.s.vmi, self.s.binding.extra
        E = s.E
        vmi.pause_vm()
        if not self.view:
            assert s.binding.lib.vmi_slat_set_domain_state(vmi.vmi, True) == 0
            self.view = vmi.slat_create()
            self.events = [E.IntEvent(self.on_int3),
                           E.SingleStepEvent(range(vmi.get_num_vcpus()), self.on_step,
                                             enable=False)]
            for event in self.events:
                vmi.register_event(event)
        shadow = extra.vmi_get_next_available_gfn(vmi.vmi)
        assert extra.vmi_alloc_gfn(vmi.vmi, shadow) == 0
        self.shadows[gfn] = shadow
        self.offsets[gfn] = [offset]
        self._refresh(gfn)
        vmi.slat_change_gfn(self.view, gfn, shadow)
        # after the remapping: change_gfn gives the entry the shadow frame's access
        guard = E.MemEvent(E.MemAccess.RW, self.on_access, gfn=gfn, slat_id=self.view)
        vmi.register_event(guard)
        self.events.append(guard)
        vmi.slat_switch(self.view)
        vmi.resume_vm()

    def remove_all(self) -> None:
        s, vmi, extra = self.s, self.s.vmi, self.s.binding.extra
        vmi.pause_vm()
        vmi.listen(0)
        for event in self.events:
            vmi.clear_event(event)
        vmi.slat_switch(0)
        for gfn, shadow in self.shadows.items():
            vmi.slat_change_gfn(self.view, gfn, INVALID_GFN)
            assert extra.vmi_free_gfn(vmi.vmi, shadow) == 0
        vmi.slat_destroy(self.view)
        assert s.binding.lib.vmi_slat_set_domain_state(vmi.vmi, False) == 0
        vmi.resume_vm()

    def _refresh(self, gfn: int) -> None:
        """Copy the original page into the shadow and plant our INT3s there."""
        vmi = self.s.vmi
        page = bytearray(vmi.read_pa(gfn << 12, 4096)[0])
        for offset in self.offsets[gfn]:
            page[offset] = 0xCC
        vmi.write_pa(self.shadows[gfn] << 12, bytes(page))

    def _to_clean_view(self, event):
        event.cffi_event.slat_id = 0
        E = self.s.E
        return Response(E.EventResponse.SLAT_ID, E.EventResponse.TOGGLE_SINGLESTEP)

    def on_int3(self, vmi, event):
        if event.gfn in self.offsets and event.offset in self.offsets[event.gfn]:
            self.hits[event.vcpu_id] = self.hits.get(event.vcpu_id, 0) + 1
            event.reinject = 0
            return self._to_clean_view(event)
        event.reinject = 1  # the guest's own
        return None

    def on_access(self, vmi, event):
        if event.out_access.value & self.s.E.MemAccess.W.value:  # a plain Enum: no `&`
            self.rewrites += 1
        return self._to_clean_view(event)

    def on_step(self, vmi, event):
        for gfn in self.shadows:  # a write may have changed an original page
            self._refresh(gfn)
        event.cffi_event.slat_id = self.view
        E = self.s.E
        return Response(E.EventResponse.SLAT_ID, E.EventResponse.TOGGLE_SINGLESTEP)


def test_shadow_breakpoint_hits_on_both_vcpus_and_the_checksum_never_sees_it():
    s = attach(vcpus=2, checksum=1)
    func = s.sym("func")
    start_calls = [s.domain.read_u64("func_calls", cpu) for cpu in (0, 1)]
    start_runs = [s.domain.read_u64("sum_runs", cpu) for cpu in (0, 1)]
    bps = ShadowBreakpoints(s)
    bps.install(func.pa >> 12, func.pa & 0xFFF)
    s.listen_until(lambda: all(s.domain.read_u64("sum_runs", cpu) >= start_runs[cpu] + 2
                               for cpu in (0, 1)), limit=5000)
    s.vmi.pause_vm()
    s.vmi.listen(0)
    for cpu in (0, 1):
        calls = s.domain.read_u64("func_calls", cpu) - start_calls[cpu]
        assert calls >= 2 and bps.hits[cpu] in (calls, calls + 1)  # +1: hit, not yet stepped
        assert s.domain.read_u64("sum_mismatch", cpu) == 0
        assert s.domain.read_u64("sum_last", cpu) == s.domain.read_u64("sum_expected")
    assert s.domain.read_u64("bp_count") == 0 and s.domain.read_u64("unexpected_count") == 0
    assert s.vmi.read_pa(func.pa, 1)[0] != b"\xcc"               # original page: clean
    assert s.vmi.read_pa(bps.shadows[func.pa >> 12] << 12 | (func.pa & 0xFFF), 1)[0] == b"\xcc"
    s.vmi.resume_vm()
    bps.remove_all()
    s.vmi.destroy()
    domain = s.domain
    assert not domain.p2m.active and not domain.monitor_enabled and domain.pause_count == 0
    assert not domain.waiting and not domain.wedged()
    assert bps.shadows[func.pa >> 12] not in domain.p2m.host
    assert all(entry.perm == Perm.RWX for entry in domain.p2m.host.values())
    runs = domain.read_u64("sum_runs", 0)
    domain.run(30_000)
    assert domain.read_u64("sum_runs", 0) > runs and domain.read_u64("sum_mismatch", 0) == 0


def test_shadow_breakpoint_on_a_page_the_guest_rewrites_runs_the_new_code():
    """Writes to the guarded page land in the original (view 0); the shadow is re-copied and
    our INT3 re-planted after each, so the guest executes what it just wrote."""
    s = attach(vcpus=1, jit=1)
    seq0 = s.domain.read_u64("jit_seq")
    bps = ShadowBreakpoints(s)
    bps.install(JIT_GFN, 0)
    s.listen_until(lambda: s.domain.read_u64("jit_seq") >= seq0 + 4, limit=500)
    s.vmi.pause_vm()
    s.vmi.listen(0)
    seq = s.domain.read_u64("jit_seq")
    assert s.domain.read_u64("jit_result") in (seq, seq - 1)
    assert bps.hits[0] in (seq - seq0, seq - seq0 - 1, seq - seq0 + 1)
    assert bps.rewrites >= 3 * (seq - seq0 - 1)  # three stores per rewrite of the page
    assert s.domain.read_u64("bp_count") == 0
    s.vmi.resume_vm()
    bps.remove_all()
