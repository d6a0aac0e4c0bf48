"""Driver catchpoints and raw-CR3 scopes, through the session as GDB would use them: a catch stop
reaches GDB with its message, `monitor catch NAME` arms the driver's, detach disarms them, and a
scoped breakpoint hands its address space to the driver."""

from __future__ import annotations

from tests.unit.fakes import FakeDriver
from tests.unit.test_session import Machine, machine
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.events import StopReason
from vmigdb.hv.base import BreakpointType, Catchpoint, DriverError, DriverStop
from vmigdb.rsp.session import Session
from vmigdb.wire import codec


class CatchingDriver(FakeDriver):
    """The fake machine, plus two catchpoints of its own."""

    def __init__(self, ncpus: int = 2) -> None:
        super().__init__(ncpus)
        self.armed: dict[str, int | None] = {}
        self.scopes: list[int | None] = []

    def catchpoints(self) -> tuple[Catchpoint, ...]:
        return (Catchpoint("msr-write", "stop on MSR writes"),
                Catchpoint("exec-written", "stop on written code", scoped=True))

    def set_catch(self, name: str, on: bool, scope_cr3: int | None = None) -> str:
        if name == "exec-written" and scope_cr3 == 0xBAD000:
            raise DriverError("that address space has no page tables")
        if on:
            self.armed[name] = scope_cr3
            return f"on ({scope_cr3})"
        self.armed.pop(name, None)
        return "off"

    def insert_breakpoint(self, type, addr, length, mechanism=None, scope_cr3=None) -> None:
        self.scopes.append(scope_cr3)
        super().insert_breakpoint(type, addr, length, mechanism)


def catching() -> Machine:
    """A session over the catching driver, attached as the server attaches."""
    driver = CatchingDriver()
    dbg = Debugger(driver)
    dbg.resume({cpu: "c" for cpu in dbg.cpus()})
    dbg.halt()
    return Machine(driver, dbg, Session(dbg))


def test_a_catch_stop_reaches_gdb_with_its_message_and_is_never_filtered() -> None:
    m = catching()
    message = "vmigdb: CPU#1 wrote MSR LSTAR (0xc0000082): 0x1 -> 0x2"
    event = m.resume(b"vCont;c", DriverStop(cpu=2, signal=5, catch="msr-write", message=message))
    assert event.reason is StopReason.CATCH and event.cpu == 2 and event.message == message
    replies = m.session.stop_replies(event)
    assert codec.decode_hex(replies[0][1:]).decode() == message + "\n"
    assert replies[-1].startswith(b"T05thread:2;")


def test_monitor_catch_lists_arms_and_disarms_the_drivers_catchpoints() -> None:
    m = catching()
    text, reply = m.monitor("catch")
    assert reply == b"OK" and "msr-write: off" in text and "exec-written [PID|cr3=ADDR]: off" in text
    text, reply = m.monitor("catch msr-write")
    assert reply == b"OK" and text.strip() == "msr-write: on (None)"
    text, reply = m.monitor("catch exec-written cr3=0x2000")
    assert reply == b"OK" and m.fake.armed == {"msr-write": None, "exec-written": 0x2000}
    text, reply = m.monitor("catch msr-write cr3=0x2000")
    assert reply == b"E01" and "takes no process" in text
    text, reply = m.monitor("catch exec-written cr3=0xbad000")
    assert reply == b"E01" and "no page tables" in text
    text, reply = m.monitor("catch nonsense")
    assert reply == b"E01" and "no catchpoint 'nonsense'" in text and "msr-write" in text
    text, reply = m.monitor("catch msr-write off")
    assert reply == b"OK" and m.fake.armed == {"exec-written": 0x2000}
    m.dbg.detach()
    assert m.fake.armed == {} and m.dbg.catches.armed == {}


def test_a_driver_without_catchpoints_says_so() -> None:
    m = machine()
    text, reply = m.monitor("catch msr-write")
    assert reply == b"E01" and "has no catchpoint 'msr-write' (it has: none)" in text


def test_a_scope_by_page_tables_reaches_the_driver_with_each_breakpoint() -> None:
    m = catching()
    text, reply = m.monitor("process cr3=0x2000")
    assert reply == b"OK" and "page tables at 0x2000" in text
    assert m.one(b"Z0,ffffffff81000000,1") == b"OK"
    m.monitor("process all")
    assert m.one(b"Z0,ffffffff81000010,1") == b"OK"
    assert m.fake.scopes == [0x2000, None]
    assert m.dbg.breakpoints.desired[(int(BreakpointType.SOFTWARE), 0xFFFFFFFF81000000, 1)] \
        .scope_cr3 == 0x2000
