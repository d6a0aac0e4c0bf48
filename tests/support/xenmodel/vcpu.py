"""One HVM vCPU: runs guest code on the machine and stops on the exits a VT-x CPU would take.

`run(budget)` executes up to `budget` instructions and returns an `Exit`. Per instruction, the
code hook sees the few instructions the hypervisor handles (decode.py) before they execute;
TLB fills walk the guest tables and the vCPU's p2m view and turn a denied access into an EPT
violation (the instruction does not complete: QEMU restores the state at its start). Guest
exceptions the monitor does not intercept are delivered through the guest IDT (delivery.py).

MTF: with `single_step` set the vCPU stops after one instruction boundary -- an instruction that
retires, or an event delivered through the IDT (the exit is then taken at the handler's first
instruction, Intel SDM vol. 3C 26.5.2). Instructions the hypervisor emulates (intercepted CR/MSR
writes, EMULATE responses) are not a boundary: Xen re-arms MTF on the next VM entry
(xen/arch/x86/hvm/vmx/intr.c vmx_intr_assist), so the next native instruction ends the step.
"""

from __future__ import annotations

from unicorn import UcError
from unicorn.unicorn_const import (
    UC_MEM_FETCH,
    UC_MEM_WRITE,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
)

from tests.support.xenmodel import delivery, operands, registers
from tests.support.xenmodel.decode import FIRST_BYTES, Insn, Kind, classify
from tests.support.xenmodel.errors import DomainCrash
from tests.support.xenmodel.exits import (
    X86_EVENTTYPE_HW_EXCEPTION,
    X86_EVENTTYPE_PRI_SW_EXCEPTION,
    Crashed,
    CrWrite,
    DebugException,
    EptViolation,
    Exit,
    Halted,
    Intercepts,
    MsrWrite,
    MtfStep,
    QuantumDone,
    SoftwareBreakpoint,
)
from tests.support.xenmodel.guest.image import VcpuInit
from tests.support.xenmodel.guest.x86 import (
    CR0_WP,
    EFER_NXE,
    PAGE,
    VEC_BP,
    VEC_DB,
    VEC_GP,
    VEC_PF,
    VEC_UD,
    VECTORS_WITH_ERROR_CODE,
)
from tests.support.xenmodel.machine import END, Machine
from tests.support.xenmodel.p2m import P2M, Perm
from tests.support.xenmodel.paging import Access, NonCanonical, PageFault, walk

ACCESS_OF = {UC_MEM_WRITE: Access.WRITE, UC_MEM_FETCH: Access.FETCH}
NEED = {Access.READ: Perm.R, Access.WRITE: Perm.W, Access.FETCH: Perm.X}


class VCpu:
    def __init__(self, vcpu_id: int, machine: Machine, p2m: P2M, intercepts: Intercepts,
                 init: VcpuInit) -> None:
        self.id = vcpu_id
        self.machine = machine
        self.p2m = p2m
        self.intercepts = intercepts
        self.view: int | None = None      # altp2m view index; None while altp2m is off
        self.single_step = False          # MTF armed (v->arch.hvm.single_step)
        self.ignore_ept = False           # set while the hypervisor emulates an instruction
        self.nowrite: list[tuple[int, bytes]] | None = None
        self.xlat: dict[int, int] = {}    # virtual page -> machine page, from this TLB epoch
        self.halted = False
        self.retired = 0                  # instructions this vCPU has retired natively
        self._stop: Insn | None = None
        self._stop_rip = 0
        self._fault: object | None = None
        self._interrupt: tuple[int, int] | None = None
        self._fault_access = Access.READ
        self._last: Insn | None = None
        self._count = 0
        machine.unload()
        machine.uc.context_restore(machine.pristine)
        self._apply_init(init)
        self.context = machine.uc.context_save()

    # --- registers and memory -------------------------------------------------------------------
    def reg(self, name: str) -> int:
        self.machine.load(self)
        return registers.read(self.machine.uc, name)

    def set_reg(self, name: str, value: int) -> None:
        self.machine.load(self)
        registers.write(self.machine.uc, name, value)
        if name in ("cr0", "cr3", "cr4", "msr_efer"):
            self.machine.flush_tlb()

    def snapshot(self) -> dict[str, int]:
        self.machine.load(self)
        return registers.snapshot(self.machine.uc)

    def cpl(self) -> int:
        return self.reg("cs_sel") & 3

    def translate(self, va: int, access: Access = Access.READ, cpl: int = 0):
        """Guest page walk through this vCPU's view (the walk's own reads are unrestricted)."""
        return walk(self._read_gpa_qword, self.reg("cr3"), va, access, cpl=cpl,
                    wp=bool(self.reg("cr0") & CR0_WP), nxe=bool(self.reg("msr_efer") & EFER_NXE))

    def read_virt(self, va: int, size: int) -> bytes:
        return b"".join(self.machine.read(maddr, n) for maddr, n in self._virt_chunks(va, size))

    def write_virt(self, va: int, data: bytes) -> None:
        offset = 0
        for maddr, n in self._virt_chunks(va, len(data), Access.WRITE):
            self.machine.write(maddr, data[offset:offset + n])
            offset += n

    def _virt_chunks(self, va: int, size: int, access: Access = Access.READ):
        while size > 0:
            result = self.translate(va, access)
            if not hasattr(result, "gpa"):
                raise DomainCrash(f"vCPU{self.id}: hypervisor access to {va:#x} faults: {result}")
            maddr = self._maddr(result.gpa)
            n = min(size, PAGE - (va & (PAGE - 1)))
            yield maddr, n
            va, size = va + n, size - n

    def _maddr(self, gpa: int) -> int:
        entry = self.p2m.lookup(self.view, gpa >> 12)
        if entry is None:
            raise DomainCrash(f"vCPU{self.id}: access to unpopulated gfn {gpa >> 12:#x}")
        return entry.mfn * PAGE | (gpa & (PAGE - 1))

    def _read_gpa_qword(self, gpa: int) -> int:
        return self.machine.read_qword(self._maddr(gpa))

    # --- running --------------------------------------------------------------------------------
    def run(self, budget: int) -> Exit:
        """Run until an exit, MTF boundary or `budget` retired instructions."""
        self.machine.load(self)
        if self.halted:
            return Halted(self.snapshot())
        done = 0
        try:
            while True:
                count = 1 if self.single_step else budget - done
                if count <= 0:
                    return QuantumDone()
                retired, boundary, exit_ = self._slice(count)
                done += retired or 1
                if exit_ is not None:
                    return exit_
                if self.single_step and boundary:
                    return MtfStep(self.snapshot())
                if self.halted:
                    return Halted(self.snapshot())
        except DomainCrash as crash:
            return Crashed(str(crash), self.snapshot())

    def emulate_one(self, nowrite: bool = False) -> Exit | None:
        """What Xen's emulator does for an EMULATE response: run the instruction past EPT checks."""
        self.machine.load(self)
        self.ignore_ept = True
        self.nowrite = [] if nowrite else None
        self.machine.flush_tlb()
        try:
            retired, _, exit_ = self._slice(1)
            self.retired -= retired  # emulated by the hypervisor, not retired by the guest
        finally:
            self.ignore_ept = False
            if self.nowrite:
                for maddr, old in reversed(self.nowrite):
                    self.machine.write(maddr, old)
            self.nowrite = None
            self.machine.flush_tlb()
        return exit_

    def _slice(self, count: int) -> tuple[int, bool, Exit | None]:
        """One emu_start; returns (instructions retired, boundary reached, exit or None)."""
        uc = self.machine.uc
        self._stop = self._fault = self._interrupt = None
        self._count = 0
        error: UcError | None = None
        self.machine.before_run()
        try:
            uc.emu_start(registers.read(uc, "rip"), END, count=count)
        except UcError as exc:
            error = exc
        retired = self._count
        if isinstance(self._fault, EptViolation | PageFault) and self._fault_access is not \
                Access.FETCH:
            retired -= 1  # the code hook counted the instruction whose data access faulted
        self.retired += retired
        if self._stop is not None:
            exit_, boundary = self._intercept(self._stop)
            return retired, boundary, exit_
        if self._fault is not None:
            boundary, exit_ = self._on_fault(self._fault)
            return retired, boundary, exit_
        if self._interrupt is not None:
            return retired, True, self._on_interrupt(*self._interrupt)
        if error is not None:
            raise DomainCrash(f"vCPU{self.id}: unicorn stopped: {error}")
        return retired, retired > 0, None

    # --- hooks (called by the machine while this vCPU is loaded) --------------------------------
    def on_tlb_fill(self, vaddr: int, access: int, entry) -> bool:
        kind = ACCESS_OF.get(access, Access.READ)
        if self._fault is not None:
            return False  # the first fault of the slice is the one the CPU takes
        self._fault_access = kind
        result = self.translate(vaddr, kind, self.cpl())
        if isinstance(result, PageFault | NonCanonical):
            self._fault = result
            return False
        gfn = result.gpa >> 12
        p2m_entry = self.p2m.lookup(self.view, gfn)
        if p2m_entry is None:
            self._fault = DomainCrash(f"vCPU{self.id}: access to unpopulated gfn {gfn:#x}")
            return False
        allowed = Perm.RWX if self.ignore_ept else p2m_entry.perm
        if not allowed & NEED[kind]:
            # Unicorn gives the page, not the address: operands.py finds the address, and the
            # registers are taken once QEMU has restored the state at the instruction's start.
            self._fault = EptViolation(gfn, vaddr, kind, 0)
            return False
        perms = UC_PROT_READ if allowed & Perm.R else 0
        perms |= UC_PROT_WRITE if allowed & Perm.W and result.writable else 0
        perms |= UC_PROT_EXEC if allowed & Perm.X and result.executable else 0
        if self.nowrite is not None:
            perms &= ~UC_PROT_WRITE
            if kind is Access.WRITE:  # EMULATE_NOWRITE: let the write land, undo it afterwards
                maddr = p2m_entry.mfn * PAGE
                self.nowrite.append((maddr, self.machine.read(maddr, PAGE)))
                perms |= UC_PROT_WRITE
        entry.paddr = p2m_entry.mfn * PAGE
        entry.perms = perms
        self.xlat[vaddr >> 12] = p2m_entry.mfn * PAGE
        return True

    def on_code(self, address: int, size: int) -> None:
        base = self.xlat.get(address >> 12)
        first = self.machine.mem[base | (address & (PAGE - 1))] if base is not None else 0x0F
        insn = None
        if first in FIRST_BYTES:
            insn = classify(self._code_bytes(address, size))
        self._last = insn
        if insn is not None and self._must_stop(insn):
            self._stop, self._stop_rip = insn, address
            self.machine.uc.emu_stop()
            return
        self._count += 1

    def on_interrupt(self, intno: int) -> None:
        self._interrupt = (intno, registers.read(self.machine.uc, "rip"))
        self.machine.uc.emu_stop()

    def on_invalid(self) -> bool:
        self._interrupt = (VEC_UD, registers.read(self.machine.uc, "rip"))
        return False

    def _code_bytes(self, address: int, size: int) -> bytes:
        data = b""
        while size > 0:
            n = min(size, PAGE - (address & (PAGE - 1)))
            base = self.xlat.get(address >> 12)
            if base is None:
                base = self._maddr(self.translate(address, Access.FETCH).gpa) & ~(PAGE - 1)
            data += self.machine.read(base | (address & (PAGE - 1)), n)
            address, size = address + n, size - n
        return data

    def _must_stop(self, insn: Insn) -> bool:
        if insn.kind is Kind.MOV_TO_CR:
            return insn.cr in self.intercepts.cr
        if insn.kind is Kind.WRMSR:
            return registers.read(self.machine.uc, "rcx") & 0xFFFF_FFFF in self.intercepts.msrs
        return insn.kind is not Kind.INT_N  # INT n runs: Unicorn raises it, the model delivers it

    # --- what a stop means ----------------------------------------------------------------------
    def _intercept(self, insn: Insn) -> tuple[Exit | None, bool]:
        """Handle an instruction stopped before it ran; returns (exit, MTF boundary reached)."""
        rip, uc = self._stop_rip, self.machine.uc
        if insn.kind is Kind.INT3:
            if self.intercepts.int3:
                return SoftwareBreakpoint(rip, insn.length, registers.snapshot(uc)), False
            delivery.deliver(self, VEC_BP, rip + insn.length, software=True)
            return None, True
        if insn.kind is Kind.ICEBP:
            if self.intercepts.debug:
                return DebugException(X86_EVENTTYPE_PRI_SW_EXCEPTION, insn.length,
                                      registers.snapshot(uc)), False
            delivery.deliver(self, VEC_DB, rip + insn.length)
            return None, True
        if insn.kind is Kind.SYSCALL:
            delivery.syscall(self, rip + insn.length)
            self.retired += 1
            return None, True
        if insn.kind is Kind.HLT:
            self.set_reg("rip", rip + insn.length)
            self.halted = True
            return None, True
        if insn.kind is Kind.MOV_TO_CR:
            return self._cr_write(insn, rip), False
        if insn.kind is Kind.WRMSR:
            return self._msr_write(insn, rip), False
        raise DomainCrash(f"vCPU{self.id}: {insn.kind.value} is not modelled")

    def _cr_write(self, insn: Insn, rip: int) -> Exit | None:
        # Xen fills the request's registers before the write, then completes the write and the
        # instruction (libvmi leaves control_register_values off, so nothing is deferred:
        # xen/arch/x86/hvm/hvm.c hvm_set_cr3, xen/arch/x86/hvm/monitor.c hvm_monitor_cr).
        regs = self.snapshot()
        new = self.reg(registers.GPRS[insn.gpr])
        old = self.reg(f"cr{insn.cr}")
        self.set_reg(f"cr{insn.cr}", new)
        self.set_reg("rip", rip + insn.length)
        if insn.cr in self.intercepts.cr_onchange and new == old:
            return None
        return CrWrite(insn.cr, old, new, regs)

    def _msr_write(self, insn: Insn, rip: int) -> Exit:
        regs = self.snapshot()
        msr = self.reg("rcx") & 0xFFFF_FFFF
        new = (self.reg("rdx") & 0xFFFF_FFFF) << 32 | self.reg("rax") & 0xFFFF_FFFF
        uc = self.machine.uc
        old = uc.msr_read(msr)
        uc.msr_write(msr, new)
        self.set_reg("rip", rip + insn.length)
        return MsrWrite(msr, old, new, regs)

    def _on_fault(self, fault) -> tuple[bool, Exit | None]:
        if isinstance(fault, EptViolation):
            fault.regs = self.snapshot()
            fault.gla = operands.fault_address(self, fault.gla & ~(PAGE - 1), fault.access)
            fault.offset = (fault.offset & ~(PAGE - 1)) | (fault.gla & (PAGE - 1))
            return False, fault
        if isinstance(fault, PageFault):
            delivery.deliver(self, VEC_PF, self.reg("rip"), error_code=fault.error_code,
                             cr2=fault.address)
            return True, None
        if isinstance(fault, NonCanonical):
            delivery.deliver(self, VEC_GP, self.reg("rip"), error_code=0)
            return True, None
        raise fault

    def _on_interrupt(self, vector: int, rip: int) -> Exit | None:
        software = self._last is not None and self._last.kind is Kind.INT_N
        if vector == VEC_DB and not software and self.intercepts.debug:
            return DebugException(X86_EVENTTYPE_HW_EXCEPTION, 0, self.snapshot())
        error_code = 0 if vector in VECTORS_WITH_ERROR_CODE and not software else None
        delivery.deliver(self, vector, rip, error_code=error_code, software=software)
        return None

    # --- setup ----------------------------------------------------------------------------------
    def _apply_init(self, init: VcpuInit) -> None:
        uc = self.machine.uc
        # CR4.PAE and EFER.LME before CR0.PG, or QEMU refuses to enable paging.
        for name, value in (("cr4", init.cr4), ("msr_efer", init.efer), ("cr0", init.cr0),
                            ("cr3", init.cr3), ("rip", init.rip), ("rsp", init.rsp),
                            ("rflags", init.rflags), ("gdtr_base", init.gdt[0]),
                            ("gdtr_limit", init.gdt[1]), ("idtr_base", init.idt[0]),
                            ("idtr_limit", init.idt[1]), *init.gprs.items()):
            registers.write(uc, name, value)
        selector, base, limit = init.tr
        uc.reg_write(registers.TABLES["tr"], (selector, base, limit, 0x8B00))
        registers.write(uc, "cs_sel", init.cs)
        registers.write(uc, "ss_sel", init.ss)
        for msr, value in init.msrs.items():
            uc.msr_write(msr, value)

