"""A simulated HVM domain as Xen keeps it: RAM, p2m/altp2m, vCPUs, pause counts, monitor ring.

Time: the guest runs only when `run(budget)` is called (libvmi's listen calls it), in
round-robin quanta of `quantum` instructions per vCPU; a vCPU whose exit produced a vm_event
request is paused until its response (the other vCPU keeps running in the same round, as on
Xen). Methods named like hypercalls follow Xen's behaviour and cite where it is decided.
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass

from tests.support.xenmodel import delivery
from tests.support.xenmodel.errors import DomainCrash, NotModelled, XenError
from tests.support.xenmodel.exits import (
    X86_EVENTTYPE_HW_EXCEPTION,
    Crashed,
    CrWrite,
    DebugException,
    EptViolation,
    Exit,
    Intercepts,
    MsrWrite,
    MtfStep,
    SoftwareBreakpoint,
)
from tests.support.xenmodel.guest.image import GuestImage
from tests.support.xenmodel.guest.x86 import PAGE, VEC_BP
from tests.support.xenmodel.machine import Machine
from tests.support.xenmodel.p2m import P2M, Perm
from tests.support.xenmodel.paging import Access
from tests.support.xenmodel.vcpu import VCpu
from tests.support.xenmodel.vmevent import (
    CTRLREG_INDEX,
    FLAG_ALTERNATE_P2M,
    FLAG_EMULATE,
    FLAG_EMULATE_NOWRITE,
    FLAG_FAST_SINGLESTEP,
    FLAG_SET_EMUL_INSN_DATA,
    FLAG_SET_EMUL_READ_DATA,
    FLAG_SET_REGISTERS,
    FLAG_TOGGLE_SINGLESTEP,
    Reason,
    Request,
    Response,
)

SET_REGISTERS_NAMES = ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10",
                       "r11", "r12", "r13", "r14", "r15", "rflags", "rip")


@dataclass
class Injection:
    """An event queued by XEN_DMOP_inject_event, delivered on the vCPU's next VM entry."""

    vector: int
    event_type: int
    insn_length: int
    error_code: int | None = None
    cr2: int | None = None


class Domain:
    def __init__(self, name: str, domid: int, image: GuestImage, *, altp2m: str = "external",
                 spare_frames: int = 256, quantum: int = 500) -> None:
        self.name, self.domid = name, domid
        self.image = image
        self.machine = Machine(image.ram_pages + spare_frames + 8)
        self.p2m = P2M(altp2m)
        for gfn in range(image.ram_pages):
            mfn = self.machine.alloc()
            self.p2m.populate(gfn, mfn)
            if gfn in image.pages:
                self.machine.write(mfn * PAGE, image.pages[gfn])
        self.intercepts = Intercepts()
        self.vcpus = [VCpu(i, self.machine, self.p2m, self.intercepts, init)
                      for i, init in enumerate(image.vcpus)]
        self.quantum = quantum
        self.pause_count = 0                  # controller_pause_count
        self.monitor_enabled = False          # the vm_event monitor ring exists
        self.ring: deque[Request] = deque()   # requests not yet taken by the monitor
        self.waiting: dict[int, Request] = {}  # vCPU id -> request it is paused on
        self.unnotified: list[Response] = []   # responses on the ring Xen has not read yet
        self.injections: dict[int, Injection] = {}
        self.emulations: dict[int, bool] = {}  # vCPU id -> EMULATE pending (True: NOWRITE)
        self.crashed: str | None = None
        self.log: list[Request] = []          # every request ever raised, for tests

    # --- pause (xen/common/domain.c *_by_systemcontroller) -------------------------------------
    def pause(self) -> None:
        if self.pause_count >= 255:
            raise XenError(errno.EOVERFLOW, "controller pause count is at its limit")
        self.pause_count += 1

    def unpause(self) -> None:
        if self.pause_count == 0:
            raise XenError(errno.EINVAL, "domain is not paused")
        self.pause_count -= 1

    @property
    def paused(self) -> bool:
        return self.pause_count > 0

    # --- memory (foreign mappings use the host p2m) --------------------------------------------
    def read_gfn(self, gfn: int, offset: int, size: int) -> bytes:
        entry = self.p2m.host.get(gfn)
        if entry is None:
            raise XenError(errno.EINVAL, f"gfn {gfn:#x} is not populated")
        return self.machine.read(entry.mfn * PAGE + offset, size)

    def write_gfn(self, gfn: int, offset: int, data: bytes) -> None:
        entry = self.p2m.host.get(gfn)
        if entry is None:
            raise XenError(errno.EINVAL, f"gfn {gfn:#x} is not populated")
        self.machine.write(entry.mfn * PAGE + offset, data)

    def read_pa(self, pa: int, size: int) -> bytes:
        return self.read_gfn(pa >> 12, pa & (PAGE - 1), size)

    def write_pa(self, pa: int, data: bytes) -> None:
        self.write_gfn(pa >> 12, pa & (PAGE - 1), data)

    def populate(self, gfn: int) -> None:
        """xc_domain_populate_physmap_exact for one frame."""
        self.p2m.populate(gfn, self.machine.alloc())

    def decrease_reservation(self, gfn: int) -> None:
        self.machine.free(self.p2m.depopulate(gfn))
        self.machine.flush_tlb()

    def tot_pages(self) -> int:
        return len(self.p2m.host)

    # --- altp2m (HVMOP_altp2m_*) ----------------------------------------------------------------
    def altp2m_set_domain_state(self, state: bool) -> None:
        self.p2m.set_active(state)
        for vcpu in self.vcpus:
            vcpu.view = 0 if state else None  # altp2m_vcpu_initialise / altp2m_vcpu_destroy
        self.machine.flush_tlb()

    def altp2m_destroy_view(self, idx: int) -> None:
        self.p2m.destroy_view(idx, in_use=any(v.view == idx for v in self.vcpus))
        self.machine.flush_tlb()

    def altp2m_switch_to_view(self, idx: int) -> None:
        """HVMOP_altp2m_switch_p2m: every vCPU to view `idx` (p2m_switch_domain_altp2m_by_id)."""
        if not self.p2m.active:
            raise XenError(errno.EOPNOTSUPP, "altp2m is not active on the domain")
        if not self.p2m.valid_view(idx):
            raise XenError(errno.EINVAL, f"altp2m view {idx} does not exist")
        for vcpu in self.vcpus:
            vcpu.view = idx
        self.machine.flush_tlb()

    def altp2m_change_gfn(self, idx: int, old: int, new: int) -> None:
        self.p2m.change_gfn(idx, old, new)
        self.machine.flush_tlb()

    def set_mem_access(self, idx: int, gfn: int, perm: Perm) -> None:
        self.p2m.set_perm(idx, gfn, perm)
        self.machine.flush_tlb()

    # --- monitor (xen/arch/x86/monitor.c, xen/common/vm_event.c) ------------------------------
    def monitor_enable(self) -> None:
        if self.monitor_enabled:
            raise XenError(errno.EBUSY, "a vm_event monitor ring is already enabled")
        self.monitor_enabled = True

    def monitor_disable(self) -> None:
        """xc_monitor_disable: vm_event_disable frees the ring and unblocks only vCPUs waiting
        for ring space; a vCPU paused on a request nobody answered stays paused for good
        (xen/common/vm_event.c). arch_monitor_cleanup_domain forgets every monitor setting."""
        self.monitor_enabled = False
        self.ring.clear()
        self.unnotified.clear()
        self.intercepts.__init__()
        for vcpu in self.vcpus:
            vcpu.single_step = False

    def debug_control(self, vcpu_id: int, single_step: bool) -> None:
        """XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON/OFF: arm or disarm MTF on one vCPU."""
        self.vcpu(vcpu_id).single_step = single_step

    def inject_trap(self, vcpu_id: int, injection: Injection) -> None:
        """XEN_DMOP_inject_event (xc_hvm_inject_trap): delivered at the next VM entry."""
        if vcpu_id in self.injections:
            raise XenError(errno.EBUSY, f"vCPU{vcpu_id} already has an event to inject")
        self.injections[vcpu_id] = injection

    def vcpu(self, vcpu_id: int) -> VCpu:
        if not 0 <= vcpu_id < len(self.vcpus):
            raise XenError(errno.ENOENT, f"no vCPU {vcpu_id}")
        return self.vcpus[vcpu_id]

    # --- running --------------------------------------------------------------------------------
    def run(self, budget: int) -> None:
        """Advance guest time: up to `budget` retired instructions per vCPU, round robin in
        quanta, stopping early when a request is on the ring, the domain is paused or dead."""
        target = {vcpu.id: vcpu.retired + budget for vcpu in self.vcpus}
        for _ in range(max(budget, 1)):  # bounds exception storms that retire nothing
            if self.paused or self.crashed is not None or self.ring:
                return
            runnable = [v for v in self.vcpus if v.id not in self.waiting and not v.halted
                        and v.retired < target[v.id]]
            if not runnable:
                return
            for vcpu in runnable:
                self._enter(vcpu)
                if vcpu.id in self.waiting or self.crashed:
                    continue
                self._handle(vcpu, vcpu.run(min(self.quantum, target[vcpu.id] - vcpu.retired)))
                if self.crashed:
                    return

    def _enter(self, vcpu: VCpu) -> None:
        """VM entry work: hvm_do_resume's emulation, then the injected event (with MTF, its
        delivery is the step: Intel SDM vol. 3C 26.7.3 "pending MTF VM exits")."""
        if vcpu.id in self.emulations:
            exit_ = vcpu.emulate_one(nowrite=self.emulations.pop(vcpu.id))
            if exit_ is not None:
                self._handle(vcpu, exit_)
                return
        injection = self.injections.pop(vcpu.id, None)
        if injection is None:
            return
        try:
            rip = vcpu.reg("rip")
            returns_after = injection.event_type != X86_EVENTTYPE_HW_EXCEPTION
            delivery.deliver(vcpu, injection.vector,
                             rip + injection.insn_length if returns_after else rip,
                             error_code=injection.error_code, cr2=injection.cr2,
                             software=injection.vector == VEC_BP)
        except DomainCrash as crash:
            self._handle(vcpu, Crashed(str(crash)))
            return
        if vcpu.single_step:
            self._handle(vcpu, MtfStep(vcpu.snapshot()))

    def _handle(self, vcpu: VCpu, exit_: Exit) -> None:
        if isinstance(exit_, Crashed):
            self.crashed = exit_.reason  # domain_crash(): every vCPU stops
            return
        request = self._request(vcpu, exit_)
        if request is None:
            return
        self.waiting[vcpu.id] = request
        self.ring.append(request)
        self.log.append(request)

    def _request(self, vcpu: VCpu, exit_: Exit) -> Request | None:
        if isinstance(exit_, MtfStep):
            # hvm_monitor_debug: no event unless the monitor enabled single-step reporting.
            if not (self.monitor_enabled and self.intercepts.singlestep):
                return None
            reason, gfn = Reason.SINGLESTEP, self._gfn_of_rip(vcpu)
        elif isinstance(exit_, EptViolation):
            if not self.monitor_enabled:
                # p2m_mem_access_check without a listener: lift the restriction and retry.
                self.p2m.set_perm(vcpu.view or 0, exit_.gfn, Perm.RWX)
                self.machine.flush_tlb()
                return None
            reason, gfn = Reason.MEM_ACCESS, exit_.gfn
        elif isinstance(exit_, SoftwareBreakpoint):
            reason, gfn = Reason.SOFTWARE_BREAKPOINT, self._gfn_of_rip(vcpu)
        elif isinstance(exit_, DebugException):
            reason, gfn = Reason.DEBUG_EXCEPTION, self._gfn_of_rip(vcpu)
        elif isinstance(exit_, CrWrite):
            reason, gfn = Reason.WRITE_CTRLREG, 0
        elif isinstance(exit_, MsrWrite):
            reason, gfn = Reason.MOV_TO_MSR, 0
        else:
            return None
        request = Request(reason, vcpu.id, exit_, gfn=gfn, regs=exit_.regs or vcpu.snapshot())
        if self.p2m.active:  # vm_event_fill_regs / monitor_traps tag the vCPU's view
            request.flags |= FLAG_ALTERNATE_P2M
            request.altp2m_idx = vcpu.view or 0
        return request

    def _gfn_of_rip(self, vcpu: VCpu) -> int:
        result = vcpu.translate(vcpu.reg("rip"), Access.FETCH, vcpu.cpl())
        return result.gpa >> 12 if hasattr(result, "gpa") else 0xFFFF_FFFF_FFFF_FFFF

    def take_request(self) -> Request | None:
        return self.ring.popleft() if self.ring else None

    def push_response(self, response: Response) -> None:
        self.unnotified.append(response)

    def notify(self) -> None:
        """The monitor's event-channel notification: Xen reads every response on the ring."""
        responses, self.unnotified = self.unnotified, []
        for response in responses:
            self.resume(response)

    def wedged(self) -> list[int]:
        """vCPUs paused on a request that was taken off the ring and will never be answered."""
        answered = {response.vcpu_id for response in self.unnotified}
        queued = {request.vcpu_id for request in self.ring}
        return [v for v in self.waiting if v not in answered and v not in queued]

    def resume(self, response: Response) -> None:
        """vm_event_resume (xen/common/vm_event.c) for one response: the order is Xen's."""
        vcpu = self.vcpu(response.vcpu_id)
        request = self.waiting.get(vcpu.id)
        if request is None:
            return  # the vCPU is not paused on the ring: Xen ignores the flags
        flags = response.flags
        if flags & FLAG_SET_EMUL_INSN_DATA or flags & FLAG_FAST_SINGLESTEP:
            raise NotModelled("SET_EMUL_INSN / NEXT_SLAT_ID (fast single-step) responses")
        if flags & FLAG_EMULATE:
            if flags & FLAG_SET_EMUL_READ_DATA:
                raise NotModelled("EMULATE with SET_EMUL_READ_DATA")
            if request.reason is Reason.MEM_ACCESS and self._still_violates(vcpu, request):
                self.emulations[vcpu.id] = bool(flags & FLAG_EMULATE_NOWRITE)
        if flags & FLAG_TOGGLE_SINGLESTEP:
            vcpu.single_step = not vcpu.single_step  # hvm_toggle_singlestep
        if flags & FLAG_ALTERNATE_P2M and self.p2m.valid_view(response.altp2m_idx):
            vcpu.view = response.altp2m_idx          # p2m_altp2m_check: invalid ids are ignored
            self.machine.flush_tlb()
        if flags & FLAG_SET_REGISTERS and response.regs is not None:
            for name in SET_REGISTERS_NAMES:         # hvm_vm_event_set_registers
                vcpu.set_reg(name, response.regs[name])
        # FLAG_DENY only cancels deferred CR/MSR writes; libvmi never asks Xen to defer them.
        del self.waiting[vcpu.id]

    def _still_violates(self, vcpu: VCpu, request: Request) -> bool:
        """p2m_mem_access_emulate_check: emulate only if the access is still refused."""
        entry = self.p2m.lookup(vcpu.view, request.gfn)
        need = {Access.READ: Perm.R, Access.WRITE: Perm.W, Access.FETCH: Perm.X}
        return entry is None or not entry.perm & need[request.exit.access]

    # --- test conveniences ----------------------------------------------------------------------
    def read_u64(self, symbol: str, index: int = 0) -> int:
        """A guest counter by image symbol (read through the host p2m)."""
        return int.from_bytes(self.read_pa(self.image.sym(symbol).pa + 8 * index, 8), "little")

    def write_u64(self, symbol: str, value: int, index: int = 0) -> None:
        self.write_pa(self.image.sym(symbol).pa + 8 * index, value.to_bytes(8, "little"))

    def views_in_use(self) -> dict[int, int | None]:
        return {vcpu.id: vcpu.view for vcpu in self.vcpus}


CTRLREG_OF_INDEX = {index: cr for cr, index in CTRLREG_INDEX.items()}
