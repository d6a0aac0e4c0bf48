"""Range stepping (`vCont;rSTART,END`, GDB's `next`) against the fake machine: how it starts.

A planned range runs at once (`c`) with a breakpoint on every exit; it starts with a single step
only when its first instruction holds a breakpoint (continuing would hit it at once) or is one
whose destination only a step can tell. Stepping right after the plan's breakpoint changes is
what QEMU 7.2 gets wrong now and then, and it costs a VM stop per `next`.
"""

from __future__ import annotations

from tests.unit.fakes import KERNEL_PA, KERNEL_VA, PAGE, PML4_PA, FakeDriver
from vmigdb.debugger.engine import Debugger, RangeStep
from vmigdb.debugger.events import StopReason
from vmigdb.hv.base import BreakpointType, DriverStop

NOPS = bytes([0x90] * 8)  # [KERNEL_VA, KERNEL_VA + 8): falls off the end only
RET = bytes([0xC3])


def machine(code: bytes) -> tuple[FakeDriver, Debugger]:
    fake = FakeDriver(1)
    fake.ram[KERNEL_PA : KERNEL_PA + len(code)] = code
    dbg = Debugger(fake)
    dbg.resume({1: "c"})
    dbg.halt()
    fake.set_reg(1, "rip", KERNEL_VA)
    dbg.state.forget()  # the fake's registers changed behind the debugger's cache
    return fake, dbg


def test_a_planned_range_runs_at_once_and_stops_at_its_end() -> None:
    fake, dbg = machine(NOPS)
    fake.resumes.clear()
    dbg.resume({1: RangeStep(KERNEL_VA, KERNEL_VA + len(NOPS))})
    assert fake.resumes == [{1: "c"}]
    assert (int(BreakpointType.SOFTWARE), KERNEL_VA + len(NOPS), 1) in fake.installed
    fake.set_reg(1, "rip", KERNEL_VA + len(NOPS))
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    event = dbg.poll()
    assert event is not None and event.reason is StopReason.STEP
    assert event.registers is not None and event.registers["rip"] == KERNEL_VA + len(NOPS)


def test_a_breakpoint_on_the_first_instruction_is_stepped_off_first() -> None:
    fake, dbg = machine(NOPS)
    dbg.add_breakpoint(BreakpointType.SOFTWARE, KERNEL_VA, 1)
    fake.resumes.clear()
    fake.queue_stop(DriverStop(cpu=1, signal=5))  # the step off it
    dbg.resume({1: RangeStep(KERNEL_VA, KERNEL_VA + len(NOPS))})
    assert fake.resumes == [{1: "s"}]
    assert dbg.poll() is None  # still in the range: vmigdb runs on by itself
    assert fake.resumes == [{1: "s"}, {1: "c"}]


def test_an_instruction_only_a_step_can_follow_is_stepped() -> None:
    fake, dbg = machine(RET + NOPS)
    fake.resumes.clear()
    dbg.resume({1: RangeStep(KERNEL_VA, KERNEL_VA + 1 + len(NOPS))})
    assert fake.resumes == [{1: "s"}]


def test_plain_steps_and_continues_are_unchanged() -> None:
    fake, dbg = machine(NOPS)
    fake.resumes.clear()
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    dbg.resume({1: "s"})
    assert fake.resumes == [{1: "s"}]
    event = dbg.poll()
    assert event is not None and event.reason is StopReason.STEP


def test_another_process_stepping_off_vmigdbs_own_breakpoint_does_not_end_the_range() -> None:
    """The stepping vCPU switches to another process, which hits a breakpoint of vmigdb's own (the
    scope's exit hook, say) outside the range: vmigdb steps it off and runs on; the range ends only
    when the stepping process leaves it (the soak saw `next` stop in do_exit)."""
    fake, dbg = machine(NOPS)
    other_cr3 = 0x8000  # the same mappings under another page-table base: another process
    fake.ram[other_cr3 : other_cr3 + PAGE] = fake.ram[PML4_PA : PML4_PA + PAGE]
    hook = KERNEL_VA + 0x100
    dbg.breakpoints.add_internal(hook, "test")
    fake.resumes.clear()
    dbg.resume({1: RangeStep(KERNEL_VA, KERNEL_VA + len(NOPS))})
    assert fake.resumes == [{1: "c"}]
    fake.set_reg(1, "cr3", other_cr3)
    fake.set_reg(1, "rip", hook)
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    assert dbg.poll() is None and fake.resumes[-1] == {1: "s"}  # stepped off
    fake.set_reg(1, "rip", hook + 2)
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    assert dbg.poll() is None and fake.resumes[-1] == {1: "c"}  # not the range's end: runs on
    fake.set_reg(1, "cr3", PML4_PA)
    fake.set_reg(1, "rip", KERNEL_VA + len(NOPS))
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    event = dbg.poll()
    assert event is not None and event.reason is StopReason.STEP
