"""`monitor dump-memory`: guest memory to a host file, and refused when serving a remote address."""

from __future__ import annotations

from tests.unit.fakes import KERNEL_VA, FakeDriver
from vmigdb.debugger.engine import Debugger
from vmigdb.rsp.session import Session
from vmigdb.wire import codec


def rcmd(session: Session, line: str) -> tuple[str, bytes]:
    replies = session.handle(b"qRcmd," + codec.encode_hex(line.encode())).replies
    text = b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode()
    return text, replies[-1]


def stopped(fake: FakeDriver) -> Debugger:
    dbg = Debugger(fake)
    dbg.resume({cpu: "c" for cpu in dbg.cpus()})
    dbg.halt()
    return dbg


def test_dump_memory_writes_what_m_reads(tmp_path) -> None:
    fake = FakeDriver(1)
    session = Session(stopped(fake))
    path = tmp_path / "dump.bin"
    text, status = rcmd(session, f"dump-memory {path} {KERNEL_VA:#x} 0x2000")
    assert status == b"OK", text
    assert f"wrote 8192 bytes from {KERNEL_VA:#x}" in text
    assert path.read_bytes() == fake.peek_virtual(KERNEL_VA, 0x2000)


def test_dump_memory_is_refused_when_serving_a_remote_address(tmp_path) -> None:
    session = Session(stopped(FakeDriver(1)), host_files=False)
    path = tmp_path / "dump.bin"
    text, status = rcmd(session, f"dump-memory {path} {KERNEL_VA:#x} 16")
    assert status == b"E01"
    assert "non-loopback" in text
    assert not path.exists()
