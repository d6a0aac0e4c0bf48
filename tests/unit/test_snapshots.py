"""Snapshots through the session with an in-memory store: `monitor snapshot` is a background
command; after a load the registers are the snapshot's, GDB's next resume gets a stop at once with
no guest code run, and GDB's breakpoints are still held."""

from __future__ import annotations

import asyncio

from tests.unit.fakes import FakeDriver
from vmigdb.debugger.engine import Debugger
from vmigdb.hv.base import BreakpointType, DriverError, SnapshotInfo, SnapshotStore
from vmigdb.rsp.session import Await, Session
from vmigdb.wire import codec


class MemoryStore(SnapshotStore):
    """Saves the fake machine's RAM and registers; load puts them back."""

    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver
        self.saved: dict[str, tuple[bytes, dict]] = {}

    async def save(self, name: str) -> float:
        if name in self.saved:
            raise DriverError(f"a snapshot named {name!r} exists")
        regs = {cpu: self.driver.reg(cpu, "rip") for cpu in self.driver.cpus()}
        self.saved[name] = (bytes(self.driver.ram), regs)
        return 0.5

    async def load(self, name: str) -> float:
        if name not in self.saved:
            raise DriverError(f"no snapshot named {name!r}")
        ram, regs = self.saved[name]
        self.driver.ram[:] = ram
        for cpu, rip in regs.items():
            self.driver.set_reg(cpu, "rip", rip)
        return 0.25

    async def delete(self, name: str) -> float:
        self.saved.pop(name)
        return 0.1

    async def list(self) -> list[SnapshotInfo]:
        return [SnapshotInfo(name, len(ram), 0.0, 1.5) for name, (ram, _) in self.saved.items()]


def _console(replies: list[bytes]) -> str:
    """What GDB prints of a monitor command's replies; ERROR ... where it failed."""
    out = [r for r in replies if r.startswith(b"O") and r != b"OK"]
    text = b"".join(codec.decode_hex(r[1:]) for r in out).decode()
    return f"ERROR {text.strip()}" if replies[-1:] == [b"E01"] else text


def _monitor(session: Session, line: str) -> str:
    outcome = session.handle(b"qRcmd," + codec.encode_hex(line.encode()))
    if isinstance(outcome.action, Await):
        return _console(asyncio.run(outcome.action.replies))
    return _console(outcome.replies)


def _machine():
    fake = FakeDriver(1)
    fake.snapshots = MemoryStore(fake)
    debugger = Debugger(fake)
    debugger.halt()
    return fake, debugger, Session(debugger)


def test_snapshot_commands_run_in_the_background():
    fake, _, session = _machine()
    outcome = session.handle(b"qRcmd," + codec.encode_hex(b"snapshot save clean"))
    assert isinstance(outcome.action, Await)  # the note at once, the answer when done
    assert _console(outcome.replies).startswith("snapshot save clean")
    assert "saved in 0.50 s" in _console(asyncio.run(outcome.action.replies))
    assert "clean" in _monitor(session, "snapshot list")
    assert "exists" in _monitor(session, "snapshot save clean")


def test_load_puts_the_snapshot_state_back_and_gdb_stops_there_at_once():
    fake, debugger, session = _machine()
    rip0 = fake.reg(1, "rip")
    session.handle(b"Z0,%x,1" % (rip0 + 0x40))
    _monitor(session, "snapshot save clean")
    fake.set_reg(1, "rip", rip0 + 0x10)
    debugger.state.forget()
    assert debugger.registers(1)["rip"] == rip0 + 0x10
    loaded = _monitor(session, "snapshot load clean")
    assert "loaded in 0.25 s" in loaded
    assert debugger.registers(1)["rip"] == rip0
    resumes = fake.count("resume")
    outcome = session.handle(b"vCont;c")
    replies = session.run(outcome.action)
    assert fake.count("resume") == resumes  # no guest code ran
    assert replies[-1].startswith(b"T00thread:1;")
    assert b"snapshot" in codec.decode_hex(replies[0][1:])
    # The next resume runs for real, with GDB's breakpoint in force.
    session.run(session.handle(b"vCont;c").action)
    assert fake.count("resume") == resumes + 1
    assert (int(BreakpointType.SOFTWARE), rip0 + 0x40, 1) in fake.installed_keys()


def test_no_store_and_bad_names_are_one_line_errors():
    fake = FakeDriver(1)
    session = Session(Debugger(fake))
    assert "keeps no snapshots" in _monitor(session, "snapshot list")
    outcome = session.handle(b"qRcmd," + codec.encode_hex(b"snapshot save a/b"))
    assert outcome.replies[-1] == b"E01"
    outcome = session.handle(b"qRcmd," + codec.encode_hex(b"snapshot frobnicate x"))
    assert outcome.replies[-1] == b"E01"


def test_process_scope_is_found_again_or_dropped_after_a_load(monkeypatch):
    from tests.unit.test_guest_interface import ToyDriver, ToyOS
    from vmigdb.guest import registry
    from vmigdb.guest.base import Process

    names = {"7": "app"}

    class ShiftingOS(ToyOS):
        def _all(self):
            return [Process(1, 0, "init", 0x1000, "S"), Process(7, 1, names["7"], 0x5000, "R")]

    monkeypatch.setattr(registry, "_KNOWN", (("toy kernel", ShiftingOS.attach),))
    fake = ToyDriver(1)
    fake.snapshots = MemoryStore(fake)
    debugger = Debugger(fake)
    debugger.halt()
    session = Session(debugger)
    assert "scope: process 7 (app)" in _monitor(session, "process app")
    _monitor(session, "snapshot save clean")
    assert "scope: process 7 (app) again" in _monitor(session, "snapshot load clean")
    assert debugger.scope is not None and debugger.scope.pid == 7
    names["7"] = "sample"  # in the loaded state, pid 7 is another program
    loaded = _monitor(session, "snapshot load clean")
    assert "scope dropped: pid 7 is 'sample' in the snapshot, not 'app'" in loaded
    assert debugger.scope is None
