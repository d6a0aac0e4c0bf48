"""A guest vmigdb cannot analyse: one line saying what was not found, plain debugging goes on."""

from __future__ import annotations

from tests.unit.fakes import KERNEL_VA, FakeDriver
from vmigdb.debugger.engine import Debugger
from vmigdb.rsp.session import Session
from vmigdb.wire import codec


class RamWithoutLinux(FakeDriver):
    """The fake machine's RAM holds page tables and patterns, but no Linux kernel."""

    def physical_ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self.ram))]


def session() -> Session:
    dbg = Debugger(RamWithoutLinux(1))
    dbg.resume({1: "c"})
    dbg.halt()
    return Session(dbg)


def rcmd(s: Session, line: str) -> tuple[str, bytes]:
    replies = s.handle(b"qRcmd," + codec.encode_hex(line.encode())).replies
    return b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode(), replies[-1]


def test_os_commands_say_what_was_not_found_in_one_line() -> None:
    s = session()
    for command in ("ps", "lsmod", "process 1", "sym init_task"):
        text, status = rcmd(s, command)
        assert status == b"E01"
        assert text.startswith("no Linux kernel vmigdb can analyse:"), text
        assert "VMCOREINFO" in text and text.strip().count("\n") == 0, text
    text, status = rcmd(s, "info")
    assert status == b"OK" and "guest: no Linux kernel vmigdb can analyse" in text


def test_plain_debugging_keeps_working() -> None:
    s = session()
    assert s.handle(b"qXfer:exec-file:read::0,1000").replies == [b"E01"]
    assert s.handle(b"vFile:open:" + codec.encode_hex(b"/vmigdb/vmlinux") + b",0,0").replies == [
        b"F-1,2"
    ]
    assert len(s.handle(b"g").replies[0]) == 2 * 608
    assert len(s.handle(b"m%x,10" % KERNEL_VA).replies[0]) == 32
