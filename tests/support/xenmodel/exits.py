"""Why a vCPU stopped running: the VM exits the model turns into vm_event requests (or not)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.support.xenmodel.paging import Access


@dataclass
class Intercepts:
    """What the monitor asked Xen to intercept (the domain's `arch.monitor` settings)."""

    int3: bool = False                              # software_breakpoint_enabled (#BP bitmap)
    debug: bool = False                             # debug_exception_enabled (#DB bitmap)
    singlestep: bool = False                        # singlestep_enabled (MTF events reported)
    cr: set[int] = field(default_factory=set)       # write_ctrlreg_enabled: 0, 3, 4
    cr_onchange: set[int] = field(default_factory=set)
    msrs: set[int] = field(default_factory=set)     # monitored MSR indexes


class Exit:
    """Base of the exits; `regs` is the register snapshot the vm_event request carries."""

    regs: dict[str, int]


@dataclass
class QuantumDone(Exit):
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class MtfStep(Exit):
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class EptViolation(Exit):
    gfn: int
    gla: int
    access: Access
    offset: int
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class SoftwareBreakpoint(Exit):
    gla: int
    insn_length: int
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class DebugException(Exit):
    event_type: int   # X86_EVENTTYPE_*: 3 hardware exception (TF), 5 privileged sw (ICEBP)
    insn_length: int
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class CrWrite(Exit):
    index: int
    old: int
    new: int
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class MsrWrite(Exit):
    msr: int
    old: int
    new: int
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class Halted(Exit):
    regs: dict[str, int] = field(default_factory=dict)


@dataclass
class Crashed(Exit):
    reason: str
    regs: dict[str, int] = field(default_factory=dict)


X86_EVENTTYPE_HW_EXCEPTION = 3
X86_EVENTTYPE_PRI_SW_EXCEPTION = 5
X86_EVENTTYPE_SW_EXCEPTION = 6
