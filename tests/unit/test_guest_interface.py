"""Another OS can sit beside Linux: a toy `GuestOS` in the registry is all the debugger, the
monitor and the session need (symbols, processes, process scope, modules, the symbol file)."""

from __future__ import annotations

import pytest

from tests.unit.fakes import KERNEL_VA, FakeDriver
from tests.unit.test_session import Machine
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.guest_view import GuestUnavailable, GuestView
from vmigdb.guest import registry
from vmigdb.guest.base import GuestError, GuestOS, Module, Process, Symbol
from vmigdb.rsp.session import Session
from vmigdb.wire import codec

EXIT = KERNEL_VA + 0x80


class ToyOS(GuestOS):
    kind = "Toy"
    attached = 0
    exiting_pid = 7

    def __init__(self, read_phys) -> None:
        self.read_phys = read_phys
        self.refreshed = 0
        self.broken = False

    @classmethod
    def attach(cls, read_phys, ram_ranges) -> ToyOS:
        cls.attached += 1
        if not ram_ranges:
            raise GuestError("no toy signature")
        return cls(read_phys)

    def fingerprint(self) -> object:
        return self.read_phys(0x10_0000, 8)

    def refresh(self) -> None:
        self.refreshed += 1

    def describe(self) -> list[tuple[str, str]]:
        return [("guest", "Toy 1.0"), ("symbols", "2")]

    def lookup_symbol(self, name: str) -> Symbol | None:
        return {"toy_exit": Symbol("toy_exit", EXIT, "T")}.get(name)

    @property
    def exec_file_name(self) -> str:
        return "/vmigdb/toy-kernel"

    @property
    def symbol_elf(self) -> bytes:
        return b"\x7fELF toy"

    def _all(self) -> list[Process]:
        if self.broken:
            raise GuestError("the process list changed under the walk")
        return [
            Process(1, 0, "init", 0x1000, "S"),
            Process(7, 1, "app", 0x5000, "R"),
            Process(8, 7, "app", 0x5000, "R", leader=False),  # a thread of 7
            Process(9, 1, "kworker", None, "I"),
        ]

    def processes(self) -> list[Process]:
        return [p for p in self._all() if p.leader]

    def find_process(self, pid: int) -> Process | None:
        return next((p for p in self._all() if p.pid == pid), None)

    def find_processes(self, name: str) -> list[Process]:
        return [p for p in self.processes() if p.comm == name and p.leader]

    def current_process(self, regs: RegisterFile) -> Process | None:
        return self.find_process(self.exiting_pid)

    def process_exit_hook(self) -> int | None:
        return EXIT

    def modules(self) -> list[Module]:
        return [Module("toydrv", 0xFFFF_FFFF_C000_0000, 0x2000)]


class ToyDriver(FakeDriver):
    def physical_ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self.ram))]


@pytest.fixture(autouse=True)
def toy_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_KNOWN", (("toy kernel", ToyOS.attach),))
    ToyOS.attached = 0
    ToyOS.exiting_pid = 7


def monitor(session, line: str) -> tuple[str, bytes]:
    replies = session.handle(b"qRcmd," + codec.encode_hex(line.encode())).replies
    return b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode(), replies[-1]


def toy_machine() -> Machine:
    fake = ToyDriver(2)
    dbg = Debugger(fake)
    dbg.resume({1: "c", 2: "c"})
    dbg.halt()
    return Machine(fake, dbg, Session(dbg))


def test_monitor_commands_through_the_interface() -> None:
    m = toy_machine()
    text, status = monitor(m.session, "info")
    assert status == b"OK" and "guest: Toy 1.0" in text and "symbols: 2" in text
    assert monitor(m.session, "sym toy_exit") == (f"toy_exit {EXIT:#x}\n", b"OK")
    text, status = monitor(m.session, "ps")
    rows = [line.split() for line in text.splitlines()[1:]]
    assert status == b"OK" and rows == [
        ["1", "0", "init", "0x1000", "S"],
        ["7", "1", "app", "0x5000", "R"],
        ["9", "1", "kworker", "-", "I"],
    ]
    text, _ = monitor(m.session, "lsmod")
    assert "toydrv" in text and "0xffffffffc0000000" in text
    assert ToyOS.attached == 1  # analysed once, kept


def test_process_scope_and_its_exit_through_the_interface() -> None:
    m = toy_machine()
    assert monitor(m.session, "process app")[1] == b"OK"
    assert m.dbg.scope is not None and (m.dbg.scope.pid, m.dbg.scope.cr3) == (7, 0x5000)
    assert m.dbg.scope.exit_hook == EXIT
    assert m.dbg.breakpoints.internal_at(EXIT, "scope")
    text, status = monitor(m.session, "process kworker")
    assert status == b"E01" and "kernel thread" in text
    assert monitor(m.session, "process 8")[1] == b"OK"  # a thread, by its id: its process's memory
    assert m.dbg.scope.exit_hook == EXIT
    ToyOS.exiting_pid = 8
    assert m.dbg.scope.is_exiting is not None
    assert m.dbg.scope.is_exiting(m.dbg.registers(1))
    ToyOS.exiting_pid = 7
    assert not m.dbg.scope.is_exiting(m.dbg.registers(1))  # another thread of it leaves


def test_a_guest_error_in_a_query_is_one_line_not_a_bug() -> None:
    m = toy_machine()
    m.dbg.guest.os().broken = True  # type: ignore[attr-defined]
    text, status = monitor(m.session, "ps")
    assert status == b"E01"
    assert text.strip() == "cannot read it from the guest: the process list changed under the walk"


def test_the_symbol_file_is_the_oses() -> None:
    m = toy_machine()
    (name,) = m.session.handle(b"qXfer:exec-file:read::0,100").replies
    assert name == b"l/vmigdb/toy-kernel"
    path = codec.encode_hex(b"/vmigdb/toy-kernel")
    (fd,) = m.session.handle(b"vFile:open:%s,0,0" % path).replies
    assert fd.startswith(b"F") and not fd.startswith(b"F-")
    (data,) = m.session.handle(b"vFile:pread:%s,100,0" % fd[1:]).replies
    assert data.endswith(b"\x7fELF toy")


def test_the_guest_runs_and_reboots() -> None:
    m = toy_machine()
    toy = m.dbg.guest.os()
    m.dbg.resume({1: "c", 2: "c"})
    assert toy.refreshed == 1  # type: ignore[attr-defined]
    m.dbg.guest.revalidate()
    assert m.dbg.guest.os() is toy
    m.fake.ram[0x10_0000] ^= 0xFF  # the fingerprint is in RAM: change it, as a reboot would
    m.dbg.guest.revalidate()
    assert m.dbg.guest.os() is not toy and ToyOS.attached == 2


class NoRamDriver(FakeDriver):
    def physical_ranges(self) -> list[tuple[int, int]]:
        return []


def test_no_os_recognised_says_why_per_os() -> None:
    with pytest.raises(GuestUnavailable, match="^no toy kernel vmigdb can analyse: no toy sig"):
        GuestView(NoRamDriver(1)).os()
    view = GuestView(FakeDriver(1))  # lists no RAM at all
    with pytest.raises(GuestUnavailable, match="^no guest OS vmigdb can analyse: the fake driver"):
        view.os()
    with pytest.raises(GuestUnavailable):  # remembered, not tried again until a new connection
        view.os()
