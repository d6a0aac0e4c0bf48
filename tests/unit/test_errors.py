"""Error replies come from one mapping (`vmigdb.rsp.errors`); a bug is an internal error, never a
malformed packet, whichever layer it happens in."""

from __future__ import annotations

import logging

import pytest

from tests.unit.fakes import KERNEL_VA
from tests.unit.test_session import machine
from vmigdb.debugger.events import StopReason
from vmigdb.debugger.policy import StealthRefused
from vmigdb.errors import INTERNAL_ERROR
from vmigdb.hv.base import DriverError, DriverStop, Unsupported
from vmigdb.rsp.errors import EINVAL, INTERNAL
from vmigdb.rsp.session import Resume


def internal_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(INTERNAL_ERROR)]


@pytest.mark.parametrize("bug", [KeyError("cr3"), ValueError("oops"), IndexError(3), TypeError()])
def test_a_bug_below_the_session_is_an_internal_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, bug: Exception
) -> None:
    """KeyError, ValueError, IndexError raised below the packet parser were E16 "malformed"."""
    m = machine()

    def broken(*_: object) -> bytes:
        raise bug

    monkeypatch.setattr(m.dbg, "read_memory", broken)
    with caplog.at_level(logging.INFO, logger="vmigdb"):
        assert m.send(b"m%x,4" % KERNEL_VA) == [INTERNAL]
    (record,) = internal_errors(caplog)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert type(bug).__name__ in record.getMessage()
    assert "malformed" not in caplog.text


def test_a_malformed_packet_stays_einval_and_is_no_bug(caplog: pytest.LogCaptureFixture) -> None:
    m = machine()
    with caplog.at_level(logging.INFO, logger="vmigdb"):
        for payload in (b"mzz,4", b"M1000,1:zz", b"X1000,1:}", b"Z0,1000,1;X3,220102", b"P1=0"):
            assert m.send(payload) == [EINVAL], payload
    assert internal_errors(caplog) == []
    assert "malformed packet" in caplog.text


def test_refusals_are_text_gdb_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine()

    def refuse(*_: object) -> None:
        raise Unsupported("the fake driver cannot write registers")

    monkeypatch.setattr(m.dbg, "write_register", refuse)
    assert m.send(b"P0=" + b"00" * 8) == [b"E.vmigdb: the fake driver cannot write registers"]


@pytest.mark.parametrize(
    ("failure", "reply"),
    [
        (DriverError("QEMU said no"), b"E05"),
        (StealthRefused("single-step would need TF"), b"E.single-step would need TF"),
        (
            Unsupported("the dump driver has no run control"),
            b"E.vmigdb: the dump driver has no run control",
        ),
        (RuntimeError("bug"), INTERNAL),
    ],
)
def test_a_failed_resume_goes_through_the_same_mapping(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    reply: bytes,
) -> None:
    """The server used to map resume failures itself; now the session does, like any packet."""
    m = machine()
    outcome = m.handle(b"vCont;c")
    assert isinstance(outcome.action, Resume)

    def fail(*_: object) -> None:
        raise failure

    monkeypatch.setattr(m.dbg, "resume", fail)
    with caplog.at_level(logging.INFO, logger="vmigdb"):
        assert m.session.run(outcome.action) == [reply]
    assert bool(internal_errors(caplog)) == (reply == INTERNAL)


def test_a_bug_in_the_stop_pipeline_reaches_gdb_as_a_stop(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GDB waits for a stop reply: a bug while interpreting a stop must not leave it hanging."""
    m = machine()
    m.session.handle(b"Z0,%x,1" % (KERNEL_VA + 0x100))
    monkeypatch.setattr(m.dbg.breakpoints, "at", lambda _addr: 1 / 0)
    with caplog.at_level(logging.INFO, logger="vmigdb"):
        event = m.resume(b"vCont;c", DriverStop(cpu=1, signal=5))
    assert event.reason is StopReason.SIGNAL and event.cpu == 1
    assert "internal error" in (event.message or "") and "ZeroDivisionError" in event.message
    assert not m.dbg.running
    assert len(internal_errors(caplog)) == 1
    assert m.session.stop_replies(event)[-1].startswith(b"T05thread:1;")


def test_a_condition_that_fails_by_a_bug_is_logged_and_the_hit_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = machine()
    rip = m.fake.reg(1, "rip")

    def buggy(_context: object) -> int:
        raise AttributeError("no such field")

    from vmigdb.hv.base import BreakpointType

    m.dbg.add_breakpoint(BreakpointType.SOFTWARE, rip, 1, (buggy,))
    with caplog.at_level(logging.INFO, logger="vmigdb"):
        event = m.resume(b"vCont;c", DriverStop(cpu=1, signal=5))
    assert event.reason is StopReason.SW_BREAK
    assert len(internal_errors(caplog)) == 1


def test_a_condition_that_cannot_tell_is_no_bug(caplog: pytest.LogCaptureFixture) -> None:
    """Bytecode reading unmapped memory: the hit is reported, quietly (GDB evaluates it again)."""
    m = machine()
    rip = m.fake.reg(1, "rip")
    # const64 UNMAPPED; ref8; end: reads a byte nobody mapped
    unmapped = KERNEL_VA + 0x4000
    code = b"\x25" + unmapped.to_bytes(8, "big") + b"\x17\x27"
    assert m.send(b"Z0,%x,1;X%x,%s" % (rip, len(code), code.hex().encode())) == [b"OK"]
    with caplog.at_level(logging.INFO, logger="vmigdb"):
        event = m.resume(b"vCont;c", DriverStop(cpu=1, signal=5))
    assert event.reason is StopReason.SW_BREAK
    assert internal_errors(caplog) == []
    assert "could not be evaluated" in caplog.text
