"""Target-side conditions: a false hit never reaches GDB, a true one does, with the right stop."""

from __future__ import annotations

from tests.unit.fakes import KERNEL_VA, FakeDriver
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.events import StopReason
from vmigdb.hv.base import DriverStop
from vmigdb.rsp.session import Resume, Session

BP = KERNEL_VA + 0x100
RDI_IS_5 = b"X7,26000522051327"  # reg rdi; const8 5; equal; end (as GDB 13 compiles $rdi == 5)


def attached(ncpus: int = 1) -> tuple[FakeDriver, Debugger, Session]:
    fake = FakeDriver(ncpus)
    dbg = Debugger(fake)
    dbg.resume({cpu: "c" for cpu in dbg.cpus()})
    dbg.halt()
    return fake, dbg, Session(dbg)


def hit(fake: FakeDriver, dbg: Debugger, rdi: int):
    fake.set_reg(1, "rip", BP)
    fake.set_reg(1, "rdi", rdi)
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    return dbg.poll()


def test_false_condition_steps_over_and_runs_on_without_gdb() -> None:
    fake, dbg, session = attached()
    assert session.handle(b"Z0,%x,1;%s" % (BP, RDI_IS_5)).replies == [b"OK"]
    outcome = session.handle(b"vCont;c")
    assert isinstance(outcome.action, Resume)
    dbg.resume(outcome.action.actions)
    fake.resumes.clear()

    assert hit(fake, dbg, rdi=3) is None  # false: not for GDB
    assert fake.resumes[-1] == {1: "s"}  # stepping off the breakpoint, alone
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    assert dbg.poll() is None
    assert fake.resumes[-1] == {1: "c"}  # and running on as GDB asked
    assert dbg.running

    event = hit(fake, dbg, rdi=5)
    assert event is not None and event.reason is StopReason.SW_BREAK
    assert session.stop_reply(event).endswith(b"swbreak:;")


def test_unconditional_breakpoint_at_the_same_address_always_stops() -> None:
    fake, dbg, session = attached()
    session.handle(b"Z0,%x,1;%s" % (BP, RDI_IS_5))
    session.handle(b"Z1,%x,1" % BP)
    dbg.resume({1: "c"})
    event = hit(fake, dbg, rdi=3)
    assert event is not None and event.reason is StopReason.SW_BREAK


def test_condition_that_cannot_be_evaluated_reports_the_stop() -> None:
    fake, dbg, session = attached()
    unreadable = b"Xb,2500000000000010001a27"  # const64 0x1000 (unmapped); ref64; end
    assert session.handle(b"Z0,%x,1;%s" % (BP, unreadable)).replies == [b"OK"]
    dbg.resume({1: "c"})
    event = hit(fake, dbg, rdi=0)
    assert event is not None and event.reason is StopReason.SW_BREAK


def test_z_again_replaces_the_conditions() -> None:
    fake, dbg, session = attached()
    session.handle(b"Z0,%x,1;%s" % (BP, RDI_IS_5))
    session.handle(b"Z0,%x,1" % BP)  # GDB re-sends Z when the condition is removed
    dbg.resume({1: "c"})
    event = hit(fake, dbg, rdi=3)
    assert event is not None and event.reason is StopReason.SW_BREAK
    assert fake.count("insert_breakpoint") == 1  # no hypervisor churn for a condition change


def test_detach_drops_the_process_scope_and_its_exit_hook() -> None:
    from vmigdb.debugger.model import ProcessScope

    fake, dbg, session = attached()
    dbg.set_scope(ProcessScope(42, "prog", 0x2000, exit_hook=KERNEL_VA + 0x200))
    assert session.handle(b"Z0,%x,1" % BP).replies == [b"OK"]
    assert len(fake.installed) == 2  # GDB's breakpoint and the exit hook
    dbg.detach()
    assert fake.installed == set() and dbg.scope is None and dbg.running
