"""The physical machine under the model: one Unicorn CPU, machine memory, and vCPU switching.

Unicorn's "physical" address space is machine memory (mfn * 4096); guest-physical addresses never
reach Unicorn. Unicorn runs in virtual-TLB mode: every TLB fill calls back into the loaded vCPU,
which walks the guest page tables and then the vCPU's p2m view, so remapping a gfn in one view
or restricting it is a matter of answering TLB fills differently (and flushing the TLB when
that answer changes). vCPUs are Unicorn CPU contexts switched in and out like a hypervisor
switches VMCSs on a physical CPU; sharing one Unicorn keeps self-modifying code coherent across
vCPUs (QEMU invalidates translated blocks on writes, whichever vCPU writes). The model's own
writes go through `uc.mem_write` for the same reason.

Ring 3 -> ring 0 transitions: Unicorn only calls hooks for SYSCALL/SYSENTER and never delivers
interrupts, and in 64-bit mode writing CS/SS through its API does not change the privilege level.
So the model enters ring 0 the one way QEMU still implements natively: a far call through a
64-bit call gate, run from a model-owned page with a model-owned GDT and TSS that are swapped in
for that one instruction (`enter_ring0`). Those pages exist only while the call runs.
"""

from __future__ import annotations

import ctypes
import struct
from collections import deque
from typing import TYPE_CHECKING

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_TLB_VIRTUAL,
    Uc,
)
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn.x86_const import UC_X86_REG_GDTR, UC_X86_REG_RAX, UC_X86_REG_RIP, UC_X86_REG_TR

from tests.support.xenmodel.guest.x86 import PAGE, gate_descriptor, segment_descriptor

if TYPE_CHECKING:
    from tests.support.xenmodel.vcpu import VCpu

STUB_VA = 0xFFFF_FFFF_FFE0_0000  # model-owned pages, mapped only during enter_ring0
STUB_CODE, STUB_GDT, STUB_TSS, STUB_END = 0, 1, 2, 3  # page indexes in the stub area
# emu_start's `until`: never reached (runs stop by count or hook), but Unicorn translates its page
# when a count runs out, so that one model page (full of HLT) is always mapped.
END = STUB_VA + STUB_END * PAGE + PAGE // 2  # Unicorn also touches the byte before it
STUB_LAND = 0x100  # offset of the call gate's target in the code page
STUB_FARPTR = 0x80
STUB_GATE_SEL = 0x18


class Machine:
    """One physical CPU (a Unicorn instance) and `frames` pages of machine memory."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self._buf = ctypes.create_string_buffer(frames * PAGE)
        self.mem = memoryview(self._buf).cast("B")
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self.uc.mem_map_ptr(0, frames * PAGE, UC_PROT_ALL, ctypes.addressof(self._buf))
        self._free: deque[int] = deque(range(frames))
        self.loaded: VCpu | None = None
        self.stub_active = False
        self._code_stale = False
        self.pristine = self.uc.context_save()
        self._stub_mfns = [self.alloc() for _ in range(4)]
        self._build_stub()
        self.uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        self.uc.hook_add(UC_HOOK_CODE, self._code)
        self.uc.hook_add(UC_HOOK_INTR, self._intr)
        self.uc.hook_add(UC_HOOK_INSN_INVALID, self._invalid)

    # --- memory ---------------------------------------------------------------------------------
    def alloc(self) -> int:
        """A zeroed machine frame."""
        if not self._free:
            raise MemoryError("the model machine is out of frames")
        mfn = self._free.popleft()
        self.write(mfn * PAGE, bytes(PAGE))
        return mfn

    def free(self, mfn: int) -> None:
        self._free.append(mfn)

    def read(self, maddr: int, size: int) -> bytes:
        return bytes(self.mem[maddr:maddr + size])

    def read_qword(self, maddr: int) -> int:
        return struct.unpack_from("<Q", self.mem, maddr)[0]

    def write(self, maddr: int, data: bytes) -> None:
        """Write machine memory from outside the guest. Unicorn's mem_write does not invalidate
        translated code (the guest's own stores do), so the translation cache is flushed before
        the CPU runs again."""
        self.uc.mem_write(maddr, bytes(data))
        self._code_stale = True

    def before_run(self) -> None:
        if self._code_stale:
            self.uc.ctl_flush_tb()
            self._code_stale = False

    # --- vCPU switching -------------------------------------------------------------------------
    def load(self, vcpu: VCpu) -> None:
        if self.loaded is vcpu:
            return
        if self.loaded is not None:
            self.uc.context_update(self.loaded.context)
        self.uc.context_restore(vcpu.context)
        self.loaded = vcpu
        self.flush_tlb()

    def unload(self) -> None:
        """Save the loaded vCPU's state back into its context (before reading contexts directly)."""
        if self.loaded is not None:
            self.uc.context_update(self.loaded.context)
            self.loaded = None

    def flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        if self.loaded is not None:
            self.loaded.xlat.clear()

    # --- ring 0 entry ---------------------------------------------------------------------------
    def enter_ring0(self) -> None:
        """Make the loaded vCPU's privilege level 0 (see module doc); clobbers only RSP and RIP."""
        uc = self.uc
        gdtr, tr, rax = uc.reg_read(UC_X86_REG_GDTR), uc.reg_read(UC_X86_REG_TR), uc.reg_read(
            UC_X86_REG_RAX)
        uc.reg_write(UC_X86_REG_GDTR, (0, STUB_VA + STUB_GDT * PAGE, 0x27, 0))
        uc.reg_write(UC_X86_REG_TR, (0, STUB_VA + STUB_TSS * PAGE, 103, 0x8900))
        uc.reg_write(UC_X86_REG_RAX, STUB_VA + STUB_FARPTR)
        self.stub_active = True
        self.flush_tlb()
        self.before_run()
        try:
            uc.emu_start(STUB_VA, END, count=1)
        finally:
            self.stub_active = False
            uc.reg_write(UC_X86_REG_GDTR, gdtr)
            uc.reg_write(UC_X86_REG_TR, tr)
            uc.reg_write(UC_X86_REG_RAX, rax)
            self.flush_tlb()
        if uc.reg_read(UC_X86_REG_RIP) != STUB_VA + STUB_LAND:
            raise RuntimeError("the model's ring-0 entry did not land")

    def _build_stub(self) -> None:
        code, gdt, tss = (mfn * PAGE for mfn in self._stub_mfns[:3])
        self.write(code, b"\x48\xff\x18")  # call far qword [rax]
        self.write(code + STUB_FARPTR, struct.pack("<QH", 0, STUB_GATE_SEL))
        self.write(code + STUB_LAND, b"\xf4")
        table = bytes(8) + segment_descriptor(0x9B, 0xA) + segment_descriptor(0x93, 0xC)
        table += gate_descriptor(STUB_VA + STUB_LAND, 0x08, dpl=3, gate_type=0xC)
        self.write(gdt, table)
        self.write(tss + 4, struct.pack("<Q", STUB_VA + STUB_TSS * PAGE + PAGE))
        self.write(self._stub_mfns[STUB_END] * PAGE, b"\xf4" * PAGE)

    def stub_frame(self, vaddr: int) -> int | None:
        """Machine address of a stub page (the `until` page always, the rest while
        `enter_ring0` runs), else None."""
        if vaddr >> 12 == END >> 12:
            return self._stub_mfns[STUB_END] * PAGE
        if not self.stub_active or not STUB_VA <= vaddr < STUB_VA + 3 * PAGE:
            return None
        return self._stub_mfns[(vaddr - STUB_VA) // PAGE] * PAGE

    # --- hooks: forwarded to the loaded vCPU ----------------------------------------------------
    def _tlb_fill(self, uc, vaddr, access, entry, _data) -> bool:
        stub = self.stub_frame(vaddr)
        if stub is not None:
            entry.paddr, entry.perms = stub, UC_PROT_ALL
            return True
        return self.loaded.on_tlb_fill(vaddr, access, entry)

    def _code(self, uc, address, size, _data) -> None:
        if not self.stub_active:
            self.loaded.on_code(address, size)

    def _intr(self, uc, intno, _data) -> None:
        self.loaded.on_interrupt(intno)

    def _invalid(self, uc, _data) -> bool:
        return self.loaded.on_invalid()
